//! Jobs: their states, their rows in SQLite and their HTTP routes.

pub mod routes;
pub mod state;
pub mod store;
