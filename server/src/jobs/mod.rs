//! Jobs: their rows in SQLite (the only code that changes them), their HTTP routes, and the paths
//! their specs may name.

pub mod continued;
pub mod paths;
pub mod routes;
pub mod store;
