//! Runs the example programs as a user would. Each one whose server is down (a dead
//! loopback port in the variable that names it) says so in one line on standard error,
//! naming the address it tried and what to start, and exits with status 1 within
//! seconds; the RocketMQ consumer runs end to end on its embedded name server and broker
//! when `ROCKETMQ_NAMESRV_ADDR` is not set.
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
    feature = "stores"
))]

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a program whose server is down may take to say so.
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
