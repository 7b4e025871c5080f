//! The library on SQLite through sea-orm (being built).
