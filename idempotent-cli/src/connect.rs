//! Opening a store from its URL, and errors that say what to fix.

use crate::CliError;
use idempotent_runtime::store::ScopeStats;
use idempotent_runtime::store::{StoreAdmin, admin_of};
use idempotent_runtime::{Store, StoreError, StoreErrorKind};

/// An open store, with what only some stores have (migrations, Redis keys).
pub(crate) enum Backend {
    /// Redis, single node or cluster.
    #[cfg(feature = "redis")]
    Redis(idempotent_runtime::RedisStore),
    /// MySQL or MariaDB.
    #[cfg(feature = "mysql")]
    MySql(idempotent_runtime::MySqlStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(idempotent_runtime::PostgresStore),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(idempotent_runtime::SqliteStore),
}

impl Backend {
    /// The store.
    pub(crate) fn store(&self) -> &dyn Store {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(s) => s,
            #[cfg(feature = "mysql")]
            Backend::MySql(s) => s,
            #[cfg(feature = "postgres")]
            Backend::Postgres(s) => s,
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(s) => s,
            #[allow(unreachable_patterns)]
            _ => unreachable!("a backend exists only with its feature"),
        }
    }

    /// The store's operator actions, which every command but `migrate` uses; an error
    /// naming the store when it has none.
    pub(crate) fn admin(&self) -> Result<&dyn StoreAdmin, StoreError> {
        admin_of(self.store())
    }

    /// Whether the store is an SQL store (which has a table).
    pub(crate) fn is_sql(&self) -> bool {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(_) => false,
            #[allow(unreachable_patterns)]
            _ => true,
        }
    }

    /// The statements `migrate` runs; `None` for stores without a schema.
    pub(crate) fn schema(&self) -> Option<Vec<String>> {
        match self {
            #[cfg(feature = "mysql")]
            Backend::MySql(s) => Some(s.schema()),
            #[cfg(feature = "postgres")]
            Backend::Postgres(s) => Some(s.schema()),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(s) => Some(s.schema()),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Creates the table; `false` for stores without a schema.
    pub(crate) async fn migrate(&self) -> Result<bool, StoreError> {
        match self {
            #[cfg(feature = "mysql")]
            Backend::MySql(s) => s.migrate().await.map(|()| true),
            #[cfg(feature = "postgres")]
            Backend::Postgres(s) => s.migrate().await.map(|()| true),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(s) => s.migrate().await.map(|()| true),
            #[allow(unreachable_patterns)]
            _ => Ok(false),
        }
    }

    /// The statistics of `scope` (every scope when `None`), and the keys the count left
    /// out because they hold no record. A Redis store counts by walking its scan (as its
    /// [`StoreAdmin::stats`] does), which counts those keys; the SQL stores count in the
    /// database, where every row is the store's.
    pub(crate) async fn stats(
        &self,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<(Vec<ScopeStats>, u64), StoreError> {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(s) => idempotent_runtime::store::scan_stats(s, scope, poisoned_at)
                .await
                .map(|st| (st.scopes, st.skipped)),
            #[allow(unreachable_patterns)]
            _ => Ok((self.admin()?.stats(scope, poisoned_at).await?, 0)),
        }
    }

    /// The Redis key of a record, on a Redis store.
    pub(crate) fn redis_key(&self, key: &idempotent_runtime::RecordKey) -> Option<Vec<u8>> {
        match self {
            #[cfg(feature = "redis")]
            Backend::Redis(s) => Some(s.redis_key(key)),
            #[allow(unreachable_patterns)]
            _ => {
                let _ = key;
                None
            }
        }
    }
}

/// The store URL with any password replaced by `***`, for messages.
pub(crate) fn redact(url: &str) -> String {
    // a Sentinel URL's password for the Sentinels is a query parameter
    if let Some((head, tail)) = url.split_once("sentinel_password=") {
        let rest = tail.find('&').map_or("", |i| &tail[i..]);
        return format!("{}sentinel_password=***{rest}", redact(head));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(not(all(
    feature = "redis",
    feature = "mysql",
    feature = "postgres",
    feature = "sqlite"
)))]
fn missing_feature(what: &str, feature: &str) -> CliError {
    CliError(format!(
        "this build of `idempotent` has no {what} support; reinstall it with \
         `cargo install --path idempotent-cli --features {feature}` (features: redis, \
         mysql, postgres, sqlite)"
    ))
}

/// Opens the store at `url`.
pub(crate) async fn open(url: &str, table: &str, prefix: &str) -> Result<Backend, CliError> {
    let shown = redact(url);
    let scheme = match url.split_once("://") {
        Some((scheme, _)) => scheme.to_ascii_lowercase(),
        None => {
            return Err(CliError(format!(
                "`{shown}` is not a store URL: write it as redis://host:6379, \
                 redis+cluster://host1:7000,host2:7001, \
                 redis+sentinel://host1:26379,host2:26379/master-name, mysql://user@host/db, \
                 postgres://user@host/db or sqlite://path/to/file.db"
            )));
        }
    };
    if url.contains(',') && !scheme.contains("cluster") && !scheme.contains("sentinel") {
        return open_redis_nodes(
            url.split(',').map(str::trim).map(str::to_owned).collect(),
            prefix,
            &shown,
        )
        .await;
    }
    match scheme.as_str() {
        "redis" | "rediss" | "redis+unix" | "unix" | "redis+sentinel" | "rediss+sentinel" => {
            open_redis(url, prefix, &shown).await
        }
        "redis+cluster" | "rediss+cluster" => {
            let tls = scheme.starts_with("rediss");
            let rest = &url[scheme.len() + 3..];
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
            let scheme = if tls { "rediss" } else { "redis" };
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{scheme}://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(CliError(format!(
                    "`{shown}` names no cluster node: write redis+cluster://host1:7000,host2:7001"
                )));
            }
            open_redis_nodes(nodes, prefix, &shown).await
        }
        "mysql" | "mariadb" => open_mysql(url, table, &shown).await,
        "postgres" | "postgresql" => open_postgres(url, table, &shown).await,
        "sqlite" => open_sqlite(url, table, &shown).await,
        other => Err(CliError(format!(
            "unsupported store URL scheme `{other}://` in `{shown}`: use redis://, rediss://, \
             redis+cluster://, redis+sentinel://, mysql://, postgres:// or sqlite://"
        ))),
    }
}

#[cfg(feature = "redis")]
async fn open_redis(url: &str, prefix: &str, shown: &str) -> Result<Backend, CliError> {
    let store = idempotent_runtime::RedisStore::connect(url)
        .await
        .map_err(|e| connect_error(e, shown))?;
    let store = store.with_prefix(prefix);
    // a round trip now, so an unreachable server is reported as such
    store
        .inspect(&idempotent_runtime::RecordKey::from_encoded(
            "idempotent-cli",
            b"ping",
        ))
        .await
        .map_err(|e| connect_error(e, shown))?;
    Ok(Backend::Redis(store))
}

#[cfg(feature = "redis")]
async fn open_redis_nodes(
    nodes: Vec<String>,
    prefix: &str,
    shown: &str,
) -> Result<Backend, CliError> {
    if let Some(bad) = nodes
        .iter()
        .find(|n| !(n.starts_with("redis://") || n.starts_with("rediss://")))
    {
        return Err(CliError(format!(
            "`{}` in the node list `{shown}` is not a redis:// or rediss:// URL",
            redact(bad)
        )));
    }
    let store = idempotent_runtime::RedisStore::connect_cluster(&nodes)
        .await
        .map_err(|e| connect_error(e, shown))?;
    Ok(Backend::Redis(store.with_prefix(prefix)))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_: &str, _: &str, _: &str) -> Result<Backend, CliError> {
    Err(missing_feature("Redis", "redis"))
}

#[cfg(not(feature = "redis"))]
async fn open_redis_nodes(_: Vec<String>, _: &str, _: &str) -> Result<Backend, CliError> {
    Err(missing_feature("Redis", "redis"))
}

/// The settings of the command's SQL pools: at most two connections, and an acquire
/// timeout of 5 s, which also bounds the wait for a host that does not answer.
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
fn pool_options<DB: idempotent_runtime::sqlx::Database>()
-> idempotent_runtime::sqlx::pool::PoolOptions<DB> {
    idempotent_runtime::sqlx::pool::PoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(5))
}

#[cfg(feature = "mysql")]
async fn open_mysql(url: &str, table: &str, shown: &str) -> Result<Backend, CliError> {
    use idempotent_runtime::MySqlStore;
    use idempotent_runtime::sqlx::mysql::MySqlConnectOptions;
    let options: MySqlConnectOptions = url.parse().map_err(|e| sql_connect_error(&e, shown))?;
    let pool = MySqlStore::open_pool(pool_options(), options)
        .await
        .map_err(|e| sql_store_error(e, shown))?;
    Ok(Backend::MySql(
        MySqlStore::from_pool(pool).with_table(table)?,
    ))
}

#[cfg(not(feature = "mysql"))]
async fn open_mysql(_: &str, _: &str, _: &str) -> Result<Backend, CliError> {
    Err(missing_feature("MySQL", "mysql"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, table: &str, shown: &str) -> Result<Backend, CliError> {
    use idempotent_runtime::PostgresStore;
    use idempotent_runtime::sqlx::postgres::PgConnectOptions;
    let options: PgConnectOptions = url.parse().map_err(|e| sql_connect_error(&e, shown))?;
    let pool = PostgresStore::open_pool(pool_options(), options)
        .await
        .map_err(|e| sql_store_error(e, shown))?;
    Ok(Backend::Postgres(
        PostgresStore::from_pool(pool).with_table(table)?,
    ))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &str, _: &str, _: &str) -> Result<Backend, CliError> {
    Err(missing_feature("PostgreSQL", "postgres"))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(url: &str, table: &str, shown: &str) -> Result<Backend, CliError> {
    use idempotent_runtime::SqliteStore;
    use idempotent_runtime::sqlx::sqlite::SqliteConnectOptions;
    let cannot_open = |e: &dyn std::fmt::Display| {
        CliError(format!(
            "cannot open the SQLite database `{shown}`: {e}; check the path (the file must \
             exist: add `?mode=rwc` to create it, for example with `migrate`)"
        ))
    };
    let options: SqliteConnectOptions = url.parse().map_err(|e| cannot_open(&e))?;
    let pool = SqliteStore::open_pool(pool_options(), options)
        .await
        .map_err(|e| match driver_error(&e) {
            Some(d) => cannot_open(d),
            None => cannot_open(&e),
        })?;
    Ok(Backend::Sqlite(
        SqliteStore::from_pool(pool).with_table(table)?,
    ))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_: &str, _: &str, _: &str) -> Result<Backend, CliError> {
    Err(missing_feature("SQLite", "sqlite"))
}

/// The driver's error behind a store error, when there is one.
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
fn driver_error(e: &StoreError) -> Option<&idempotent_runtime::sqlx::Error> {
    std::error::Error::source(e)?.downcast_ref()
}

/// An error of opening an SQL pool: the driver's error explained by
/// [`sql_connect_error`]; without one (the server did not answer within the acquire
/// timeout), an unreachable database.
#[cfg(any(feature = "mysql", feature = "postgres"))]
fn sql_store_error(e: StoreError, shown: &str) -> CliError {
    match driver_error(&e) {
        Some(driver) => sql_connect_error(driver, shown),
        None => unreachable_database(&e, shown),
    }
}

/// A driver's error of connecting, with what to fix.
#[cfg(any(feature = "mysql", feature = "postgres"))]
fn sql_connect_error(e: &idempotent_runtime::sqlx::Error, shown: &str) -> CliError {
    use idempotent_runtime::sqlx::Error;
    match e {
        Error::Configuration(_) => CliError(format!(
            "invalid store URL `{shown}`: {e}; write it as mysql://user:password@host:3306/db \
             or postgres://user:password@host:5432/db"
        )),
        Error::Database(d) => CliError(format!(
            "the database at `{shown}` refused the connection: {}; check the user, password \
             and database name",
            d.message()
        )),
        _ => unreachable_database(e, shown),
    }
}

#[cfg(any(feature = "mysql", feature = "postgres"))]
fn unreachable_database(e: &dyn std::fmt::Display, shown: &str) -> CliError {
    CliError(format!(
        "cannot reach the database at `{shown}`: {e}; check that it runs and the host \
         and port in --store / IDEMPOTENT_STORE_URL"
    ))
}

#[cfg(feature = "redis")]
fn connect_error(e: StoreError, shown: &str) -> CliError {
    match e.kind() {
        StoreErrorKind::Unavailable => CliError(format!(
            "cannot reach Redis at `{shown}`: {e}{}; check that it runs and the host and port \
             in --store / IDEMPOTENT_STORE_URL",
            source_text(&e)
        )),
        _ => CliError(format!(
            "cannot use Redis at `{shown}`: {e}{}; check the URL and credentials",
            source_text(&e)
        )),
    }
}

fn source_text(e: &StoreError) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!(" ({s})"),
        None => String::new(),
    }
}

/// A store error of a command, with what to do about it.
pub(crate) fn explain(e: StoreError, table: &str, sql: bool) -> CliError {
    if sql && missing_table(&e) {
        return CliError(format!(
            "the table `{table}` does not exist: create it with `idempotent migrate` (or give \
             `idempotent schema --print` to your DBA), or pass --table / IDEMPOTENT_TABLE \
             with the table your consumers use ({e})"
        ));
    }
    match e.kind() {
        StoreErrorKind::Unavailable => CliError(format!(
            "the store is unreachable: {e}{}; check that it runs and the URL in --store / \
             IDEMPOTENT_STORE_URL",
            source_text(&e)
        )),
        _ => CliError(format!("{e}{}", source_text(&e))),
    }
}

pub(crate) fn missing_table(e: &StoreError) -> bool {
    let text = format!("{e} {}", source_text(e)).to_ascii_lowercase();
    text.contains("does not exist") && text.contains("relation")
        || text.contains("doesn't exist")
        || text.contains("no such table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(
            redact("redis+sentinel://:pw@h:26379/m?sentinel_password=s2&sentinel_username=u"),
            "redis+sentinel://:***@h:26379/m?sentinel_password=***&sentinel_username=u"
        );
    }
}
