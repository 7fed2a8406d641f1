//! The SQLite database: one file in WAL mode, schema from `migrations/` applied at start, and the
//! one way to write several statements atomically ([`WriteTx`]).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

/// Opens (creating if needed) `<data_dir>/cpt.sqlite3` and migrates it.
pub async fn open(data_dir: &Path) -> anyhow::Result<SqlitePool> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("cpt.sqlite3");
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL with NORMAL is durable across application crashes; only an OS crash can lose the
        // last transactions, never corrupt the file.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        // A slow disk must not turn into a pile of waiting requests: they get a 503 instead.
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    sqlx::migrate!("../migrations").run(&pool).await?;
    Ok(pool)
}

/// A write transaction that takes SQLite's write lock when it begins (`BEGIN IMMEDIATE`), so it
/// never fails half-way with `database is locked` after reading.
///
/// Its connection goes back to the pool only after a successful commit. A transaction that failed
/// or was dropped closes its connection instead: after `SQLITE_FULL` a `COMMIT` leaves the
/// transaction open, and a pooled connection stuck inside it would hold the write lock and keep
/// later writes in a transaction nobody commits.
pub struct WriteTx {
    connection: PoolConnection<Sqlite>,
    committed: bool,
}

impl WriteTx {
    pub async fn begin(pool: &SqlitePool) -> sqlx::Result<WriteTx> {
        let mut connection = pool.acquire().await?;
        if let Err(error) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *connection).await {
            connection.close_on_drop();
            return Err(error);
        }
        Ok(WriteTx { connection, committed: false })
    }

    /// The connection, for the transaction's statements.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }

    pub async fn commit(mut self) -> sqlx::Result<()> {
        sqlx::query("COMMIT").execute(&mut *self.connection).await?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.committed {
            // Closing the connection rolls the transaction back in SQLite.
            self.connection.close_on_drop();
        }
    }
}

/// Proves the database takes writes now: a write transaction that commits.
pub async fn probe_write(pool: &SqlitePool) -> sqlx::Result<()> {
    let mut tx = WriteTx::begin(pool).await?;
    sqlx::query("INSERT INTO probes (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
        .bind(crate::now_ms())
        .execute(tx.conn())
        .await?;
    tx.commit().await
}

/// Bytes free for unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}
