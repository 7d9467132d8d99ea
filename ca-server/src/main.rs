//! `ca-server`: set up a CA, register lines, serve enrollment. See `ca-server --help`.

fn main() -> std::process::ExitCode {
    ca_server::cli::main_with_args(std::env::args_os())
}
