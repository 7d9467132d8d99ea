//! ca-server
