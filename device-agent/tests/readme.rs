//! The README's command blocks, run as written, in order, in one bash session: every line of
//! every ```sh block runs verbatim unless it is named below with the reason it does not (a
//! load run of minutes, the CI script itself). A line added to the README runs too, so a
//! command that does not work as written fails the test. Test-only steps around some lines
//! set the stage the README gives in words and check that a line did what the README says.
//!
//! The commands are the real binaries: `device-agent` and `line-station` of this package, and
//! `ca-server`, played by this test binary itself (a link named `ca-server` to it runs
//! `ca_server::cli`, the CA's whole command line, as the simulator does). The README's loopback
//! ports (8443-8445, 5683, 9443, 9444, 9683) are the one thing changed: each is mapped to a
//! free port, the same in every line. It needs openssl, curl, jq and coap-client-notls (`.ci/run`
//! installs them).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode};

/// The whole walkthrough takes a few seconds; past this, something hangs.
const WALKTHROUGH_LIMIT_SECS: u32 = 240;

/// README lines that do not run here, by prefix, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "cargo run --release -p simulator",
        "100,000 devices: minutes of load; simulator/tests run the simulator",
    ),
    (".ci/run", "the CI script, which runs this test"),
    (
        "simulator ",
        "load runs of minutes; simulator/tests run the simulator",
    ),
    (
        "eval \"$(ca-server/scripts/test-postgres.sh start)\"",
        "the test suite's own database, which .ci/run starts around this test",
    ),
    ("cargo test ", "the test suite, which runs this test"),
    (
        "IMPRINT_TEST_STORE=postgres cargo test",
        "the test suite, which runs this test",
    ),
    (
        "IMPRINT_TEST_PKCS11=",
        "the test suite's token pass, which runs this test",
    ),
    (
        "ca-server/scripts/test-postgres.sh stop",
        "the test suite's own database",
    ),
    (
        "ca-server init --dir ca --store ",
        "a PostgreSQL server at the example address; the CA's suite inits every test CA on \
         PostgreSQL (IMPRINT_TEST_STORE=postgres in .ci/run)",
    ),
    (
        "ca-server serve --dir ca --node-id ",
        "several nodes need the CA on PostgreSQL; ca-server/tests/two_processes.rs runs two \
         serve processes with --node-id on one database",
    ),
    (
        "ca-server store copy --dir ca --to ",
        "a PostgreSQL server at the example address; ca-server/tests/store_copy.rs runs the \
         command against the test database",
    ),
];

/// Test-only steps, run before the README line that starts with the key. They only set the
/// stage the README describes in words ("with the server stopped").
const BEFORE: &[(&str, &str)] = &[
    (
        "ca-server secrets import --dir ca keys.jsonl",
        "printf '{\"key_id\": \"imported-1\", \"key\": \"%s\"}\\n' \"$(openssl rand -hex 32)\" > keys.jsonl\n\
         stop_serve",
    ),
    (
        "export IMPRINT_ADMIN=",
        // Before the exports, the admin client says what each missing file is.
        "out=$(ca-server line list 2>&1 || true); grep -q 'operator add' <<<\"$out\"\n\
         out=$(ca-server line list --operator-cert ca/operators/alice.pem \
         --operator-key ca/operators/alice.key.pem 2>&1 || true)\n\
         grep -q 'ca.pem in the CA folder' <<<\"$out\"",
    ),
];

/// Test-only checks, run after the README line that starts with the key: that the line did
/// what the README says (a `curl` without `--fail` exits 0 on a refusal, so each is asked
/// again with `--fail`). Output is kept in a variable before `grep -q` reads it: with
/// pipefail, a writer cut off by `grep -q` quitting early would fail the script at random.
const AFTER: &[(&str, &str)] = &[
    (
        "ca-server dukpt derive --ksn",
        // The device side and the host side agree on a transaction's key, around the rollover
        // too.
        "for n in 1 2 131070 131072 131073; do\n\
           dev=$(device-agent dukpt --state pos.state --counter $n)\n\
           ksn=$(awk '/^ksn/ {print $2}' <<<\"$dev\")\n\
           host=$(ca-server dukpt derive --ksn \"$ksn\")\n\
           test \"$(awk '/^kcv/ {print $2}' <<<\"$dev\")\" = \"$(awk '/^kcv/ {print $2}' <<<\"$host\")\"\n\
         done\n\
         show=$(ca-server device show 900001 --json)\n\
         jq -e '.secrets[0].initial_key_id | startswith(\"12345678\")' <<<\"$show\" >/dev/null",
    ),
    (
        "ca-server secrets import --dir ca keys.jsonl",
        "start_serve",
    ),
    (
        "device-agent enroll --state dev.state",
        // IMPRINT_LOG=info logs the enrollment, without colour codes in a file.
        "grep -q 'enrolled' serve.log || { echo 'no log line for the enrollment' >&2; exit 1; }\n\
         if grep -q $'\\x1b\\[' serve.log; then echo 'colour codes in the log file' >&2; exit 1; fi",
    ),
    (
        "curl --cacert ca/ca.pem --cert dev.pem --key dev.key",
        "curl -sSf --cacert ca/ca.pem --cert dev.pem --key dev.key -H 'Accept: application/json' \
         https://127.0.0.1:8444/secret | jq -e .version >/dev/null",
    ),
    (
        "curl --cacert ca/ca.pem -H 'Content-Type: application/json'",
        "subject=$(curl -sSf --cacert ca/ca.pem -H 'Content-Type: application/json' \
         -H 'Accept: application/pem-certificate-chain' --data-binary @req.json \
         https://127.0.0.1:8443/enroll | openssl x509 -noout -subject)\n\
         grep -q 700002 <<<\"$subject\"",
    ),
    (
        "coap-client-notls -m post",
        // The CoAP request, sent again, got the certificate the HTTPS request got.
        "test -s resp.cbor\n\
         curl -sSf --cacert ca/ca.pem -H 'Content-Type: application/json' \
         -H 'Accept: application/pem-certificate-chain' --data-binary @req.json \
         https://127.0.0.1:8443/enroll | openssl x509 -outform DER > https.der\n\
         cmp -s https.der <(tail -c \"$(stat -c %s https.der)\" resp.cbor)",
    ),
    (
        "ca-server audit verify --json | jq -r .expect",
        // The head in the form --expect takes, accepted by --expect.
        "ca-server audit verify --expect \"$(ca-server audit verify --json | jq -r .expect)\" >/dev/null",
    ),
    (
        "ca-server serve --dir ca-sim",
        // The second CA serves on its own ports, beside the first.
        "for _ in $(seq 1 100); do curl -sf --cacert ca-sim/ca.pem https://127.0.0.1:9443/ca -o /dev/null && break; sleep 0.1; done\n\
         curl -sSf --cacert ca-sim/ca.pem https://127.0.0.1:9443/ca -o ca-sim.der\n\
         cmp -s ca-sim.der <(openssl x509 -in ca-sim/ca.pem -outform DER)\n\
         curl -sSf --cacert ca/ca.pem https://127.0.0.1:8443/ca -o /dev/null",
    ),
    (
        "ca-server device revoke 700001",
        // A second revocation changes nothing and counts nothing.
        "ca-server device revoke 700001 >/dev/null\n\
         metrics=$(curl -sSf --cacert ca/ca.pem --cert ca/operators/alice.pem \
         --key ca/operators/alice.key.pem https://127.0.0.1:8445/metrics)\n\
         grep -qx 'imprint_revocations_total{node=\"[^\"]*\"} 1' <<<\"$metrics\"",
    ),
];

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let me = args.first().map(Path::new);
    if me
        .and_then(Path::file_name)
        .is_some_and(|n| n == "ca-server")
    {
        return ca_server::cli::main_with_args(args);
    }
    if args.iter().any(|a| a == "--list") {
        println!("readme: test");
        return ExitCode::SUCCESS;
    }
    walkthrough();
    println!("test readme ... ok");
    ExitCode::SUCCESS
}

fn walkthrough() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let link = |name: &str, target: &Path| {
        std::os::unix::fs::symlink(target, bin.join(name)).unwrap();
    };
    link("ca-server", &std::env::current_exe().unwrap());
    link(
        "device-agent",
        Path::new(env!("CARGO_BIN_EXE_device-agent")),
    );
    link(
        "line-station",
        Path::new(env!("CARGO_BIN_EXE_line-station")),
    );
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();

    // The README's loopback ports, each mapped to a free one, so that the walkthrough does not
    // collide with a CA the user (or another run of this test) has on them.
    let ports: Vec<(String, String)> = README_PORTS
        .iter()
        .map(|p| {
            (
                format!("127.0.0.1:{p}"),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    let local = |text: &str| {
        ports
            .iter()
            .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
    };
    let mut script = String::from(PRELUDE);
    let mut ran = 0;
    for readme_line in sh_lines(&text) {
        let line = local(&readme_line);
        if let Some((_, why)) = NOT_RUN.iter().find(|(p, _)| readme_line.starts_with(p)) {
            script += &format!("# not run ({why}): {line}\n");
            continue;
        }
        for (p, step) in BEFORE {
            if readme_line.starts_with(p) {
                script += &format!("{}\n", local(step));
            }
        }
        script += &format!("readme_line {}\n", shell_quote(&line));
        if is_foreground_serve(&line) {
            script += "start_serve\n";
        } else {
            script += &format!("{line}\n");
        }
        for (p, step) in AFTER {
            if readme_line.starts_with(p) {
                script += &format!("{}\n", local(step));
            }
        }
        ran += 1;
    }
    assert!(
        ran > 40,
        "only {ran} README lines found: is the README parsed?"
    );
    std::fs::write(tmp.path().join("readme.sh"), &script).unwrap();
    // A command that hangs (a CoAP client waits 90 s for an answer) must not hang the suite:
    // `timeout` stops the whole walkthrough, its process group included.
    let out = Command::new("timeout")
        .args(["-k", "5", &WALKTHROUGH_LIMIT_SECS.to_string(), "bash"])
        .arg(tmp.path().join("readme.sh"))
        .current_dir(&work)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("IMPRINT_ADMIN")
        .env_remove("IMPRINT_OPERATOR_CERT")
        .env_remove("IMPRINT_OPERATOR_KEY")
        .env_remove("IMPRINT_CA_CERT")
        .output()
        .unwrap();
    if !out.status.success() {
        let last = std::fs::read_to_string(work.join(".readme-line")).unwrap_or_default();
        panic!(
            "the README walkthrough failed (exit {:?}{}) at README line: {last}\n--- stdout\n{}\n--- stderr\n{}\n--- script\n{script}",
            out.status.code(),
            if out.status.code() == Some(124) {
                format!(", stopped after {WALKTHROUGH_LIMIT_SECS} s")
            } else {
                String::new()
            },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
}

/// Helpers the script defines first: the serve line of "Serve" runs in the background, its
/// stdout and its log (IMPRINT_LOG=info) in files, and the script waits for its listening line.
const PRELUDE: &str = r#"set -euo pipefail
SERVE_LINE=
SERVE_PID=
readme_line() { CURRENT="$1"; printf '%s\n' "$1" > .readme-line; }
trap 'echo "README line failed: $CURRENT" >&2; [ -f serve.log ] && tail -20 serve.log >&2' ERR
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
start_serve() {
    if [ -z "$SERVE_LINE" ]; then SERVE_LINE="$CURRENT"; fi
    : > serve.out
    IMPRINT_LOG=info bash -c "exec $SERVE_LINE" > serve.out 2>> serve.log &
    SERVE_PID=$!
    for _ in $(seq 1 300); do
        grep -q '^ca-server: listening' serve.out && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || { cat serve.log >&2; return 1; }
        sleep 0.1
    done
    echo "no listening line" >&2
    return 1
}
stop_serve() {
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID"
}
"#;

/// The loopback ports the README names (TCP for HTTPS, mutual TLS and admin; UDP for CoAP).
const README_PORTS: [u16; 7] = [8443, 8444, 8445, 5683, 9443, 9444, 9683];

/// A port free on loopback for both TCP and UDP just now.
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() && !README_PORTS.contains(&port) {
            return port;
        }
    }
}

/// `ca-server serve ...` as the "Serve" section gives it: in the foreground (no `&`).
fn is_foreground_serve(line: &str) -> bool {
    line.starts_with("ca-server serve ") && !line.trim_end().ends_with('&')
}

/// The logical lines of every ```sh block: continuation lines joined, blank lines dropped.
fn sh_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for raw in text.lines() {
        let t = raw.trim_end();
        if !in_sh {
            in_sh = t == "```sh";
            continue;
        }
        if t == "```" {
            in_sh = false;
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            pending += head;
            pending.push(' ');
            continue;
        }
        pending += t;
        let line = std::mem::take(&mut pending).trim().to_string();
        if !line.is_empty() && !line.starts_with('#') {
            lines.push(line);
        }
    }
    lines
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
