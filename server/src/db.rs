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

/// One page of rows fetched newest first with `LIMIT limit + 1` (the extra row only says there is
/// more): the page's items and the cursor of the next page (the last item's `rowid`).
pub fn page<T>(
    rows: &[sqlx::sqlite::SqliteRow],
    limit: i64,
    item: impl Fn(&sqlx::sqlite::SqliteRow) -> sqlx::Result<T>,
) -> sqlx::Result<(Vec<T>, Option<i64>)> {
    use sqlx::Row;
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next = if more { rows.last().map(|r| r.get::<i64, _>("rowid")) } else { None };
    Ok((rows.iter().map(item).collect::<sqlx::Result<_>>()?, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database in `dir` migrated up to, not including, the migration whose description has `before`.
    async fn migrated_before(dir: &std::path::Path, before: &str) -> SqlitePool {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", dir.join("db").display()))
            .unwrap()
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let mut earlier = sqlx::migrate!("../migrations");
        let position = earlier.migrations.iter().position(|m| m.description.contains(before)).unwrap();
        earlier.migrations = earlier.migrations[..position].to_vec().into();
        earlier.run(&pool).await.unwrap();
        pool
    }

    /// A database from before `extend_vocab`, `paused` and `parent_id` existed keeps its jobs, events and attempts when the
    /// jobs table is rebuilt, and its foreign keys stay enforced.
    #[tokio::test]
    async fn rebuilding_the_jobs_table_keeps_rows_and_foreign_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", tmp.path().join("db").display()))
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let mut before_vocabularies = sqlx::migrate!("../migrations");
        let position =
            before_vocabularies.migrations.iter().position(|m| m.description.contains("job kinds states and lineage"));
        before_vocabularies.migrations = before_vocabularies.migrations[..position.unwrap()].to_vec().into();
        before_vocabularies.run(&pool).await.unwrap();
        let insert_job = "INSERT INTO jobs (id, kind, name, spec, state, max_attempts, created_at, updated_at, retries)
                          VALUES (?, ?, 'n', '{}', 'running', 3, 1, 1, 2)";
        sqlx::query(insert_job).bind("a").bind("train").execute(&pool).await.unwrap();
        assert!(sqlx::query(insert_job).bind("b").bind("extend_vocab").execute(&pool).await.is_err());
        sqlx::query("INSERT INTO events (job_id, attempt, seq, kind, time, data) VALUES ('a', 1, 0, 'step', 1, '{}')")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO attempts (job_id, attempt, worker_id, started_at) VALUES ('a', 1, 'w', 1)")
            .execute(&pool)
            .await
            .unwrap();

        sqlx::migrate!("../migrations").run(&pool).await.unwrap();
        let kept: (String, i64) =
            sqlx::query_as("SELECT kind, retries FROM jobs WHERE id = 'a'").fetch_one(&pool).await.unwrap();
        assert_eq!(kept, ("train".to_string(), 2));
        let events: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE job_id = 'a'").fetch_one(&pool).await.unwrap();
        assert_eq!(events, 1);
        sqlx::query(insert_job).bind("b").bind("extend_vocab").execute(&pool).await.unwrap();
        sqlx::query("UPDATE jobs SET state = 'paused' WHERE id = 'b'").execute(&pool).await.unwrap();
        let orphans = sqlx::query("PRAGMA foreign_key_check").fetch_all(&pool).await.unwrap();
        assert!(orphans.is_empty(), "every event and attempt has its job");
        let orphan =
            sqlx::query("INSERT INTO attempts (job_id, attempt, worker_id, started_at) VALUES ('nope', 1, 'w', 1)");
        assert!(orphan.execute(&pool).await.is_err(), "foreign keys are enforced again");
        let indexes: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND name LIKE 'jobs_by_%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(indexes, 3 + 1, "the three 0004 rebuilt, and 0005's jobs_by_sweep");
    }

    /// Jobs that evaluated before 0006 get their latest eval per set from their events.
    #[tokio::test]
    async fn latest_evals_are_filled_from_the_events_of_earlier_jobs() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = migrated_before(tmp.path(), "latest evals").await;
        for id in ["a", "b"] {
            sqlx::query("INSERT INTO jobs (id, kind, name, spec, state, max_attempts, created_at, updated_at) VALUES (?, 'train', 'n', '{}', 'succeeded', 3, 1, 1)")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
        let evals = [(1, 0, "domain", 50.0), (1, 1, "general", 40.0), (1, 2, "domain", 30.0), (2, 0, "domain", 31.0)];
        for (attempt, seq, set, perplexity) in evals {
            let data = format!(
                r#"{{"seq": {seq}, "time": 1, "kind": "eval", "step": {seq}, "set": "{set}", "loss": 1.0, "perplexity": {perplexity}, "tokens": 8}}"#
            );
            sqlx::query("INSERT INTO events (job_id, attempt, seq, kind, time, data) VALUES ('a', ?, ?, 'eval', 1, ?)")
                .bind(attempt)
                .bind(seq)
                .bind(data)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::migrate!("../migrations").run(&pool).await.unwrap();
        let latest = |id: &'static str| {
            sqlx::query_scalar::<_, Option<String>>("SELECT latest_evals FROM jobs WHERE id = ?")
                .bind(id)
                .fetch_one(&pool)
        };
        let a: serde_json::Value = serde_json::from_str(&latest("a").await.unwrap().unwrap()).unwrap();
        assert_eq!((a["domain"]["perplexity"].as_f64(), a["domain"]["step"].as_u64()), (Some(31.0), Some(0)), "{a}");
        assert_eq!(a["general"]["perplexity"].as_f64(), Some(40.0));
        assert_eq!(latest("b").await.unwrap(), None, "a job without evals has none");
    }

    /// Chains of continued jobs from before 0007 get each job's root stored.
    #[tokio::test]
    async fn every_earlier_job_gets_the_root_of_its_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = migrated_before(tmp.path(), "root id").await;
        for (id, parent) in [("a", None), ("b", Some("a")), ("c", Some("b")), ("d", None)] {
            sqlx::query("INSERT INTO jobs (id, kind, name, spec, state, max_attempts, created_at, updated_at, parent_id) VALUES (?, 'train', 'n', '{}', 'succeeded', 3, 1, 1, ?)")
                .bind(id)
                .bind(parent)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::migrate!("../migrations").run(&pool).await.unwrap();
        let roots: Vec<(String, String)> =
            sqlx::query_as("SELECT id, root_id FROM jobs ORDER BY id").fetch_all(&pool).await.unwrap();
        let expected = [("a", "a"), ("b", "a"), ("c", "a"), ("d", "d")].map(|(i, r)| (i.to_string(), r.to_string()));
        assert_eq!(roots, expected);
    }

    /// Events stored before 0008 get their step as a column (a started event its first step).
    #[tokio::test]
    async fn earlier_events_get_their_step_as_a_column() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = migrated_before(tmp.path(), "event steps").await;
        sqlx::query("INSERT INTO jobs (id, kind, name, spec, state, max_attempts, created_at, updated_at) VALUES ('a', 'train', 'n', '{}', 'running', 3, 1, 1)")
            .execute(&pool)
            .await
            .unwrap();
        let events = [("step", r#"{"step": 7}"#), ("started", r#"{"from_step": 3}"#), ("log", r#"{"message": "m"}"#)];
        for (seq, (kind, data)) in events.iter().enumerate() {
            sqlx::query("INSERT INTO events (job_id, attempt, seq, kind, time, data) VALUES ('a', 1, ?, ?, 1, ?)")
                .bind(seq as i64)
                .bind(kind)
                .bind(data)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::migrate!("../migrations").run(&pool).await.unwrap();
        let steps: Vec<Option<i64>> =
            sqlx::query_scalar("SELECT step FROM events ORDER BY seq").fetch_all(&pool).await.unwrap();
        assert_eq!(steps, [Some(7), Some(3), None]);
    }
}
