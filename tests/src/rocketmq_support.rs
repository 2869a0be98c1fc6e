//! An embedded Apache RocketMQ (the Rust implementation, 1.0) for the RocketMQ tests:
//! a name server and a broker started inside the test process on free loopback ports,
//! with a temporary store directory and every delay level set to one second, so
//! `ReconsumeLater` redeliveries come back in about a second.
//!
//! Compiled with the `rocketmq` feature only.
#![cfg(feature = "rocketmq")]

use rocketmq_broker::config::broker_config::BrokerConfig;
use rocketmq_broker::config::validated::ValidatedBrokerConfig;
use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig, TelemetryHandle};
use rocketmq_namesrv::NamesrvConfig;
use rocketmq_namesrv::bootstrap::Builder as NameServerBuilder;
use rocketmq_observability::TelemetryRuntimeGuard;
use rocketmq_runtime::RuntimeContext;
use rocketmq_store::MessageStoreConfig;
use rocketmq_transport::api::ServerConfig;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Eighteen delay levels of one second each (the broker's default runs to two hours).
pub const ONE_SECOND_DELAY_LEVELS: &str = "1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A broker listen port whose companion port (`port - 2`, the broker's fast listener)
/// is free too.
fn free_broker_port() -> u16 {
    for _ in 0..100 {
        let normal = TcpListener::bind("127.0.0.1:0").expect("probe a loopback port");
        let port = normal.local_addr().expect("local address").port();
        let Some(fast) = port.checked_sub(2) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", fast)).is_ok() {
            return port;
        }
    }
    panic!("no pair of free loopback ports (p, p - 2) for the embedded RocketMQ broker");
}

/// How many times [`EmbeddedRocketMq::start`] tries to start the broker.
const BROKER_START_ATTEMPTS: usize = 4;

/// An error and its sources, one per line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = format!("{e} ({e:?})");
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    s
}

/// One attempt to initialize and start a broker registered with `namesrv_addr`.
async fn start_broker(
    context: &RuntimeContext,
    store_root: &std::path::Path,
    name: &str,
    namesrv_addr: &str,
) -> Result<rocketmq_broker::BrokerBootstrap<rocketmq_broker::Running>, String> {
    let broker_port = free_broker_port();
    let store_root_str = store_root.to_string_lossy().into_owned();
    let mut broker_config = BrokerConfig {
        broker_ip1: "127.0.0.1".into(),
        listen_port: u32::from(broker_port),
        store_path_root_dir: store_root_str.clone().into(),
        namesrv_addr: Some(namesrv_addr.to_owned().into()),
        auto_create_topic_enable: true,
        ..BrokerConfig::default()
    };
    broker_config.broker_server_config.bind_address = "127.0.0.1".to_owned();
    broker_config.broker_server_config.listen_port = u32::from(broker_port);
    broker_config.broker_identity.broker_name = format!("idempotent-{name}").into();
    let store_config = MessageStoreConfig {
        store_path_root_dir: store_root_str.into(),
        message_delay_level: ONE_SECOND_DELAY_LEVELS.to_owned(),
        ha_listen_address: std::net::Ipv4Addr::LOCALHOST.into(),
        ha_listen_port: usize::from(free_port()),
        // the broker refuses to start on a disk over 75 % full by default; a test broker
        // writes a few kilobytes, so only a nearly full disk (95 %, the most it allows)
        // stops it. The three ratios must rise in this order.
        disk_max_used_space_ratio: 95,
        disk_space_clean_forcibly_ratio: 96,
        disk_space_warning_level_ratio: 97,
        ..MessageStoreConfig::default()
    };
    let validated = ValidatedBrokerConfig::try_from_parts(broker_config, store_config)
        .map_err(|e| format!("configuration (port {broker_port}): {}", chain(&e)))?;
    let broker = rocketmq_broker::Builder::new(
        context.service_context("broker"),
        TelemetryRuntimeGuard::noop(),
    )
    .with_validated_config(validated)
    .build()
    .initialize()
    .await
    .map_err(|e| format!("initialization (port {broker_port}): {}", chain(&e)))?
    .start()
    .await
    .map_err(|e| format!("start (port {broker_port}): {}", chain(&e)))?;
    if !broker.readiness().registration_ready() {
        broker.shutdown().await;
        return Err(format!(
            "the broker on port {broker_port} did not register with its name server"
        ));
    }
    Ok(broker)
}

/// The broker's store folder: in memory (`/dev/shm`) where there is one, since the
/// broker measures the fullness of the disk its store is on and refuses to start on a
/// shared machine's nearly full disk whatever the little a test writes; otherwise the
/// temporary folder.
fn temp_root() -> PathBuf {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random bytes");
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() && tempfile_ok(shm) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "idempotent-rocketmq-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(b)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir for the embedded RocketMQ");
    dir
}

/// Whether this process can create a folder in `dir`.
fn tempfile_ok(dir: &std::path::Path) -> bool {
    let probe = dir.join(format!("idempotent-rocketmq-probe-{}", std::process::id()));
    let ok = std::fs::create_dir_all(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

/// A name server and a broker running in this process; stopped by [`shutdown`](Self::shutdown).
pub struct EmbeddedRocketMq {
    /// `127.0.0.1:port` of the name server, for clients.
    pub namesrv_addr: String,
    root: PathBuf,
    context: RuntimeContext,
    namesrv_stop: Option<oneshot::Sender<()>>,
    namesrv_task: Option<tokio::task::JoinHandle<()>>,
    broker: Option<rocketmq_broker::BrokerBootstrap<rocketmq_broker::Running>>,
}

impl std::fmt::Debug for EmbeddedRocketMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRocketMq")
            .field("namesrv_addr", &self.namesrv_addr)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl EmbeddedRocketMq {
    /// Starts a name server and a broker (auto-created topics, one-second delay levels),
    /// each bound to 127.0.0.1 only. Must run on a multi-threaded tokio runtime.
    pub async fn start(name: &str) -> Self {
        let root = temp_root();
        let context = RuntimeContext::from_current(format!("idempotent-{name}"));

        // the name server (its default bind address is 0.0.0.0)
        let namesrv_port = free_port();
        let namesrv_dir = root.join("namesrv");
        std::fs::create_dir_all(&namesrv_dir).expect("name server dir");
        let namesrv_config = NamesrvConfig {
            rocketmq_home: root.to_string_lossy().into_owned(),
            kv_config_path: namesrv_dir
                .join("kvConfig.json")
                .to_string_lossy()
                .into_owned(),
            config_store_path: namesrv_dir
                .join("namesrv.properties")
                .to_string_lossy()
                .into_owned(),
            ..NamesrvConfig::default()
        };
        let server_config = ServerConfig {
            bind_address: "127.0.0.1".to_owned(),
            listen_port: u32::from(namesrv_port),
            ..ServerConfig::default()
        };
        let (namesrv_stop, stopped) = oneshot::channel::<()>();
        let namesrv =
            NameServerBuilder::new(context.service_context("namesrv"), TelemetryHandle::noop())
                .set_name_server_config(namesrv_config)
                .set_server_config(server_config)
                .build();
        let namesrv_task = tokio::spawn(async move {
            if let Err(e) = namesrv
                .boot_with_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
            {
                eprintln!("embedded RocketMQ name server stopped with an error: {e}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", namesrv_port)).is_err() {
            assert!(
                !namesrv_task.is_finished(),
                "the embedded RocketMQ name server exited during start-up"
            );
            assert!(
                Instant::now() < deadline,
                "the embedded RocketMQ name server did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let namesrv_addr = format!("127.0.0.1:{namesrv_port}");

        // the broker: a start that fails (a port taken between probing and binding, a
        // registration that times out on a loaded machine) is retried with fresh ports
        // and a fresh store directory, reporting the whole error chain each time
        let mut failures = Vec::new();
        let broker = loop {
            let attempt = failures.len() + 1;
            match start_broker(
                &context,
                &root.join(format!("store-{attempt}")),
                name,
                &namesrv_addr,
            )
            .await
            {
                Ok(broker) => break broker,
                Err(e) => {
                    eprintln!("embedded RocketMQ broker, attempt {attempt}: {e}");
                    failures.push(e);
                    assert!(
                        failures.len() < BROKER_START_ATTEMPTS,
                        "the embedded RocketMQ broker did not start in {BROKER_START_ATTEMPTS} attempts: {failures:#?}"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        EmbeddedRocketMq {
            namesrv_addr,
            root,
            context,
            namesrv_stop: Some(namesrv_stop),
            namesrv_task: Some(namesrv_task),
            broker: Some(broker),
        }
    }

    /// A client runtime for producers and consumers of this test.
    pub fn client_runtime(&self, scope: &'static str) -> Arc<ClientRuntime> {
        ClientRuntime::try_new(
            self.context.service_context(scope),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .unwrap_or_else(|e| panic!("RocketMQ client runtime: {e}"))
    }

    /// Stops the broker alone (the name server and the clients' runtime go on), as a
    /// broker outage; [`shutdown`](Self::shutdown) still stops the rest.
    pub async fn stop_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }

    /// Stops the broker and the name server and removes the store directory.
    pub async fn shutdown(mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
        if let Some(stop) = self.namesrv_stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.namesrv_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = self.context.shutdown_tasks(Duration::from_secs(5)).await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
