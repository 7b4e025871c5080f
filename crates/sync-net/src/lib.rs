//! Authenticated, encrypted peer connections (being built).
