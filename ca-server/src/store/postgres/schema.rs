//! The PostgreSQL schema, as numbered migrations. `ca-server init` applies them all; `serve`
//! refuses a schema whose version is not [`SCHEMA_VERSION`].
//!
//! Every invariant lives in the database itself, so that it holds with any number of CA
//! processes writing at once: one device per serial (primary key), one serial per public key
//! (primary key of `keys`, never deleted: a key stays bound to its serial even after a reset),
//! one enrollment per (line, token id), one holder per secret keyed hash and per key id
//! (`secret_keys`), a pool entry taken once (deleted in the transaction that binds it, and its
//! `secret_keys` row updated only while it has no holder), and a line's count never above its
//! quota (a check constraint, and the count raised by a conditional update).
//!
//! Serials are unsigned 64-bit numbers stored in `bigint` columns bit for bit: serials up to
//! 9,223,372,036,854,775,807 read as themselves; larger ones read as negative numbers (the
//! serial minus 2^64).

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 8;

/// (version, SQL). Each runs in one transaction with the row that records it.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, V1),
    (2, V2),
    (3, V3),
    (4, V4),
    (5, V5),
    (6, V6),
    (7, V7),
    (8, V8),
];

/// Version 8: a DUKPT BDK may be an object in the CA's PKCS#11 token instead of sealed under
/// the key-encryption key: `token_object` names it (its label), and such a row holds no key
/// bytes at all (no ciphertext, no nonce); a sealed one holds both and no label.
const V8: &str = r#"
ALTER TABLE dukpt_bdks ADD COLUMN token_object text;
ALTER TABLE dukpt_bdks ALTER COLUMN ciphertext DROP NOT NULL, ALTER COLUMN nonce DROP NOT NULL;
ALTER TABLE dukpt_bdks ADD CONSTRAINT dukpt_bdks_custody CHECK (
    (token_object IS NULL AND ciphertext IS NOT NULL AND nonce IS NOT NULL)
    OR (token_object IS NOT NULL AND ciphertext IS NULL AND nonce IS NULL)
);
"#;

/// Version 7: each audit entry's MAC under the audit key (SPEC.md 11.9); NULL for the entries
/// written before the key existed. Whoever can write these tables but has no key can no longer
/// rewrite the chain unseen.
const V7: &str = "ALTER TABLE audit ADD COLUMN mac bytea;";

/// Version 6: AES DUKPT Base Derivation Keys, sealed under the key-encryption key (never in
/// the clear: the CA opens them with the KEK only to derive), each with its allocation counter
/// (raised by a conditional update in the transaction of the version that takes a derivation
/// id; the Initial Key ID is that version's key id, unique in `secret_keys`), and each line's
/// secret source (`random`, `pool` or `dukpt:BDKID`).
const V6: &str = r#"
CREATE TABLE dukpt_bdks (
    id               text PRIMARY KEY CHECK (id ~ '^[0-9A-F]{8}$'),
    algorithm        text NOT NULL CHECK (algorithm IN ('aes-128', 'aes-256')),
    ciphertext       bytea NOT NULL,
    nonce            bytea NOT NULL,
    kcv              bytea NOT NULL,
    created_at       bigint NOT NULL,
    next_derivation  bigint NOT NULL DEFAULT 0 CHECK (next_derivation BETWEEN 0 AND 4294967296)
);
ALTER TABLE lines ADD COLUMN secret_source text NOT NULL DEFAULT 'random';
"#;

/// Version 5: revoked operators (names are issued once: the name stands for its certificate).
const V5: &str = "CREATE TABLE operator_revocations (
    name        text PRIMARY KEY,
    revoked_at  bigint NOT NULL,
    actor       text NOT NULL
);";

/// Version 4: the last CRL number any node gave (RFC 5280 5.2.3: numbers only grow, across
/// every node of the CA).
const V4: &str = r#"
CREATE TABLE crl_number (
    id      integer PRIMARY KEY CHECK (id = 1),
    number  bigint NOT NULL
);
INSERT INTO crl_number VALUES (1, 0);
"#;

/// Version 3: the CA nodes serving from this schema. Each running `serve` process (an
/// instance: a random id drawn at start) writes its row every `[store] refresh_ms`; the nodes
/// seen within three intervals share each line's rate limit (SPEC.md 10.1). Rows of instances
/// gone for a day are deleted by the next heartbeat.
const V3: &str = r#"
CREATE TABLE nodes (
    instance  text PRIMARY KEY,
    node      text NOT NULL,
    started   timestamptz NOT NULL,
    seen      timestamptz NOT NULL
);
"#;

/// Version 2: the CA node that wrote each audit entry (NULL for entries written before).
const V2: &str = "ALTER TABLE audit ADD COLUMN node text;";

const V1: &str = r#"
CREATE TABLE imprint_schema (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE lines (
    id            text PRIMARY KEY,
    public_key    bytea NOT NULL,
    first_serial  bigint NOT NULL,
    last_serial   bigint NOT NULL,
    quota         bigint NOT NULL CHECK (quota >= 1),
    rate          integer NOT NULL DEFAULT 0 CHECK (rate >= 0),
    enrolled      bigint NOT NULL DEFAULT 0 CHECK (enrolled >= 0 AND enrolled <= quota),
    active        boolean NOT NULL,
    created_at    bigint NOT NULL
);

-- serial -> key -> certificate: the binding.
CREATE TABLE devices (
    serial       bigint PRIMARY KEY,
    spki         bytea NOT NULL,
    key_hash     bytea NOT NULL CHECK (length(key_hash) = 32),
    certificate  bytea NOT NULL,
    line         text NOT NULL REFERENCES lines (id),
    token_id     bytea NOT NULL,
    enrolled_at  bigint NOT NULL,
    status       text NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at   bigint,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX devices_line_enrolled_at ON devices (line, enrolled_at);
CREATE INDEX devices_revoked ON devices (serial) WHERE status = 'revoked';

-- A public key is bound to one serial for ever (a reset frees the serial, not the key).
CREATE TABLE keys (
    key_hash  bytea PRIMARY KEY CHECK (length(key_hash) = 32),
    serial    bigint NOT NULL
);

-- A token id is consumed by one enrollment of its line.
CREATE TABLE tokens (
    line      text NOT NULL,
    token_id  bytea NOT NULL,
    serial    bigint NOT NULL,
    PRIMARY KEY (line, token_id)
);

-- Every secret ever generated or imported: its keyed hash and key id, held by a device's
-- version, or by the pool while (serial, version) are null.
CREATE TABLE secret_keys (
    index_tag  bytea PRIMARY KEY,
    key_id     text NOT NULL UNIQUE,
    serial     bigint,
    version    bigint,
    CHECK ((serial IS NULL) = (version IS NULL))
);
CREATE UNIQUE INDEX secret_keys_holder ON secret_keys (serial, version) WHERE serial IS NOT NULL;

CREATE TABLE secret_versions (
    serial        bigint NOT NULL,
    version       bigint NOT NULL CHECK (version >= 1),
    key_id        text NOT NULL UNIQUE,
    ciphertext    bytea NOT NULL,
    nonce         bytea NOT NULL,
    kcv           bytea NOT NULL,
    index_tag     bytea NOT NULL UNIQUE REFERENCES secret_keys (index_tag),
    source        text NOT NULL,
    created_at    bigint NOT NULL,
    delivered_at  bigint,
    confirmed_at  bigint,
    retired_at    bigint,
    PRIMARY KEY (serial, version)
);

CREATE TABLE secret_pool (
    key_id       text PRIMARY KEY,
    ciphertext   bytea NOT NULL,
    nonce        bytea NOT NULL,
    kcv          bytea NOT NULL,
    index_tag    bytea NOT NULL UNIQUE REFERENCES secret_keys (index_tag),
    imported_at  bigint NOT NULL
);

-- Earlier bindings of a serial, moved here by a reset (seq: the reset's audit entry).
CREATE TABLE device_resets (
    serial       bigint NOT NULL,
    seq          bigint NOT NULL,
    spki         bytea NOT NULL,
    certificate  bytea NOT NULL,
    line         text NOT NULL,
    token_id     bytea NOT NULL,
    enrolled_at  bigint NOT NULL,
    reset_at     bigint NOT NULL,
    actor        text NOT NULL,
    PRIMARY KEY (serial, seq)
);

-- The append-only, hash-chained audit log, and its head: every writing transaction locks the
-- head row first, so entries chain in commit order whatever the number of writers.
CREATE TABLE audit (
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    at         bigint NOT NULL,
    event      text NOT NULL,
    serial     bigint,
    actor      text NOT NULL,
    detail     text NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);
CREATE INDEX audit_serial ON audit (serial) WHERE serial IS NOT NULL;

CREATE TABLE audit_head (
    id    integer PRIMARY KEY CHECK (id = 1),
    seq   bigint NOT NULL,
    hash  bytea NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');
"#;
