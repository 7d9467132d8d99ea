//! device-agent
