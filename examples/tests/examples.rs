//! Runs the example programs as a user would. Each one whose server is down (a dead
//! loopback port in the variable that names it) says so in one line on standard error,
//! naming the address it tried and what to start, and exits with status 1 within
//! seconds; the RocketMQ consumer runs end to end on its embedded name server and broker
//! when `ROCKETMQ_NAMESRV_ADDR` is not set; the outbox pipeline, which needs no server,
//! runs end to end and its summary is checked.
//!
//! The programs are the ones `cargo test` builds beside this test, in
//! `target/<profile>/examples/`: run it with `cargo test -p idempotent-examples
//! --all-features` (or the workspace's test command), which builds them first. Redis
//! must be up, as for the rest of the suite: the consumers reach it before their broker,
//! and the RocketMQ example keeps its records there.
#![cfg(any(
    feature = "redis-streams",
    feature = "nats",
    feature = "amqp",
    feature = "kafka",
    feature = "rocketmq",
    feature = "http",
    feature = "stores",
    feature = "sqlite"
))]

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a program whose server is down may take to say so.
#[cfg(any(
    feature = "redis-streams",
    feature = "nats",
    feature = "amqp",
    feature = "kafka",
    feature = "rocketmq",
    feature = "http",
    feature = "stores"
))]
const FAIL_WITHIN: Duration = Duration::from_secs(10);

/// What a program did: its exit status, its output, how long it ran.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// The example program `name`, as `cargo test` built it.
fn example(name: &str) -> Command {
    let test = std::env::current_exe().expect("the test's path");
    let path = test
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/")
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p idempotent-examples --all-features` builds it",
        path.display()
    );
    let mut cmd = Command::new(path);
    // the ROCKETMQ_NAMESRV_ADDR of the environment, if any, is no part of any case
    cmd.env_remove("ROCKETMQ_NAMESRV_ADDR");
    cmd
}

/// Runs `cmd` to its end; kills it and fails after `limit`.
fn run(mut cmd: Command, limit: Duration) -> Ran {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the example");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the example") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still ran after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        took: start.elapsed(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `cmd`, whose server is down, and checks that it says in one line of standard
/// error each of `says` (the address, what to start, the variable to set), exits with
/// status 1, and does so within [`FAIL_WITHIN`].
#[cfg(any(
    feature = "redis-streams",
    feature = "nats",
    feature = "amqp",
    feature = "kafka",
    feature = "rocketmq",
    feature = "http",
    feature = "stores"
))]
fn fails_fast(cmd: Command, says: &[&str]) -> String {
    let what = format!("{cmd:?}");
    let ran = run(cmd, FAIL_WITHIN * 3);
    let line = ran.stderr.trim_end();
    assert_eq!(
        ran.status.code(),
        Some(1),
        "{what}: exit status\nstdout:\n{}\nstderr:\n{line}",
        ran.stdout
    );
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "{what}: one line of error, not\n{line}"
    );
    for s in says {
        assert!(line.contains(s), "{what}: {s:?} missing from\n{line}");
    }
    assert!(
        ran.took < FAIL_WITHIN,
        "{what}: took {:?} to say\n{line}",
        ran.took
    );
    line.to_owned()
}

#[cfg(feature = "redis-streams")]
#[test]
fn redis_streams_consumer_without_redis() {
    let mut cmd = example("redis_streams_consumer");
    cmd.env("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:1");
    fails_fast(
        cmd,
        &[
            "redis://127.0.0.1:1",
            "redis-server",
            "IDEMPOTENT_REDIS_URL",
        ],
    );
}

#[cfg(feature = "nats")]
#[test]
fn nats_consumer_without_nats() {
    let mut cmd = example("nats_consumer");
    cmd.env("IDEMPOTENT_NATS_URL", "nats://127.0.0.1:1");
    fails_fast(
        cmd,
        &[
            "nats://127.0.0.1:1",
            "nats-server -js",
            "IDEMPOTENT_NATS_URL",
        ],
    );
}

#[cfg(feature = "amqp")]
#[test]
fn amqp_consumer_without_rabbitmq() {
    let mut cmd = example("amqp_consumer");
    cmd.env("IDEMPOTENT_AMQP_URL", "amqp://guest:secret@127.0.0.1:1/%2f");
    let line = fails_fast(
        cmd,
        &[
            "amqp://guest:***@127.0.0.1:1",
            "rabbitmq-server",
            "IDEMPOTENT_AMQP_URL",
        ],
    );
    assert!(
        !line.contains("secret"),
        "the password is not printed: {line}"
    );
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_consumer_without_kafka() {
    let mut cmd = example("kafka_consumer");
    cmd.env("IDEMPOTENT_KAFKA_BROKERS", "127.0.0.1:1");
    fails_fast(cmd, &["Kafka at 127.0.0.1:1", "IDEMPOTENT_KAFKA_BROKERS"]);
}

#[cfg(feature = "rocketmq")]
#[test]
fn rocketmq_consumer_without_its_name_server() {
    let mut cmd = example("rocketmq_consumer");
    cmd.env("ROCKETMQ_NAMESRV_ADDR", "127.0.0.1:1");
    fails_fast(
        cmd,
        &["127.0.0.1:1", "mqnamesrv", "unset ROCKETMQ_NAMESRV_ADDR"],
    );
}

#[cfg(feature = "rocketmq")]
#[test]
fn rocketmq_consumer_without_mysql() {
    let mut cmd = example("rocketmq_consumer");
    cmd.args(["--store", "mysql"])
        .env("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:1/test");
    fails_fast(
        cmd,
        &["mysql://root@127.0.0.1:1/test", "IDEMPOTENT_MYSQL_URL"],
    );
}

/// The example end to end, on the name server and broker it starts itself (and Redis).
#[cfg(feature = "rocketmq")]
#[test]
fn rocketmq_consumer_runs_on_its_embedded_broker() {
    let ran = run(example("rocketmq_consumer"), Duration::from_secs(120));
    assert!(
        ran.status.success(),
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        ran.status,
        ran.stdout,
        ran.stderr
    );
    assert!(
        ran.stdout
            .contains("ROCKETMQ_NAMESRV_ADDR is not set: started a name server")
            && ran
                .stdout
                .contains("50 orders charged, 0 charged more than once"),
        "{}",
        ran.stdout
    );
}

#[cfg(feature = "http")]
#[test]
fn http_without_redis() {
    let mut cmd = example("http");
    cmd.args(["--store", "redis"])
        .env("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:1");
    fails_fast(cmd, &["redis://127.0.0.1:1", "IDEMPOTENT_REDIS_URL"]);
    let mut cmd = example("http_bench");
    cmd.env("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:1");
    fails_fast(cmd, &["redis://127.0.0.1:1", "IDEMPOTENT_REDIS_URL"]);
}

#[cfg(feature = "stores")]
#[test]
fn benchmarks_without_their_servers() {
    let mut cmd = example("bench");
    cmd.env("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:1");
    fails_fast(cmd, &["redis://127.0.0.1:1", "IDEMPOTENT_REDIS_URL"]);
    let mut cmd = example("bench");
    cmd.args(["--stores", "mysql"])
        .env("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:1/test");
    fails_fast(cmd, &["127.0.0.1:1", "IDEMPOTENT_MYSQL_URL"]);
    let mut cmd = example("roundtrips");
    cmd.args(["--stores", "postgres"]).env(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:1/test",
    );
    fails_fast(cmd, &["127.0.0.1:1", "IDEMPOTENT_POSTGRES_URL"]);
    // the outbox cases need NATS with JetStream
    let mut cmd = example("bench");
    cmd.args(["--stores", "none", "--outbox", "sqlite"])
        .env("IDEMPOTENT_NATS_URL", "nats://127.0.0.1:1");
    fails_fast(cmd, &["nats://127.0.0.1:1", "IDEMPOTENT_NATS_URL"]);
    let mut cmd = example("cli_bench");
    cmd.args(["--stores", "postgres"]).env(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:1/test",
    );
    fails_fast(cmd, &["127.0.0.1:1", "IDEMPOTENT_POSTGRES_URL"]);
    let mut cmd = example("cli_bench");
    cmd.args(["--stores", "redis", "--bin", "/nonexistent/idempotent"]);
    fails_fast(cmd, &["/nonexistent/idempotent", "cargo build --release"]);
}

/// The outbox pipeline end to end (SQLite in a temporary directory, in-process queues):
/// each kind of trouble happens and is handled, and the summary shows every order
/// written once by stage 1 and paid once by stage 2, every payment message sent once
/// from the outbox and nothing pending or dead.
#[cfg(feature = "sqlite")]
#[test]
fn pipeline_pays_each_order_once_through_the_outbox() {
    let ran = run(example("pipeline"), Duration::from_secs(60));
    let out = &ran.stdout;
    assert!(
        ran.status.success() && ran.stderr.is_empty(),
        "{:?} after {:?}\nstdout:\n{out}\nstderr:\n{}",
        ran.status,
        ran.took,
        ran.stderr
    );
    let orders: u64 = out
        .strip_prefix("idempotent pipeline: ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no order count in the first line:\n{out}"));
    assert!(orders > 0);
    let summary = &out[out
        .find("\nsummary\n")
        .unwrap_or_else(|| panic!("no summary in\n{out}"))..];
    // the value of the first summary line `label` that follows `after`
    let value = |label: &str, after: &str| -> String {
        let from = &summary[summary
            .find(after)
            .unwrap_or_else(|| panic!("{after:?}: {out}"))..];
        let line = from
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no summary line {label:?} in\n{out}"));
        line.trim_start()[label.len()..].trim().to_owned()
    };
    let number = |s: String| -> u64 { s.parse().unwrap_or_else(|_| panic!("{s:?}: {out}")) };
    let all = format!("{orders} of {orders}");
    assert_eq!(value("orders written once", "summary"), all, "{out}");
    assert_eq!(value("orders paid once", "summary"), all, "{out}");
    assert_eq!(value("orders paid twice or more", "summary"), "0", "{out}");
    assert_eq!(value("orders never paid", "summary"), "0", "{out}");
    assert_eq!(
        value("payment messages in the outbox", "summary"),
        format!("{orders} sent, 0 pending, 0 dead"),
        "{out}"
    );
    assert_eq!(
        value("payments matching their order", "summary"),
        format!("{all} (amount, message id)"),
        "{out}"
    );
    assert_eq!(
        value("troubles met and handled", "summary"),
        "6 of 6",
        "{out}"
    );
    // stage 2 was given a message twice, and ran its body once per order
    let deliveries = number(value("stage 2 deliveries", "summary"));
    let replays = number(value("answered from its dedup rows", "stage 2 deliveries"));
    assert!(replays >= 1, "{out}");
    assert_eq!(deliveries, orders + replays, "{out}");
    assert_eq!(
        number(value("stage 2 body runs", "summary")),
        orders,
        "{out}"
    );
    // a line for each kind of trouble
    for event in [
        "the producer's resend: answered from stage 1's dedup row",
        "redelivered after its lost ack: answered from stage 1's dedup row",
        "crashed before dispatch",
        "died before marking it sent",
        "once relay-1's lease ran out",
        "delivered again: answered from stage 2's dedup row",
        "rolled back (0 order rows, 0 messages emitted, 0 pending in the outbox)",
        "failed again (attempt 2",
        "now that the broker is back",
    ] {
        assert!(out.contains(event), "{event:?} missing from\n{out}");
    }
    assert!(
        out.contains("\nok: every order was paid exactly once"),
        "{out}"
    );
}
