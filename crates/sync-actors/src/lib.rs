//! The sync engine: actix actors and the host-facing handle (being built).
