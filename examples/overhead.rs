//! Per-message cost of the attribute and protocol on the memory store, and the
//! allocations it makes, on a current-thread and on a multi-thread tokio runtime:
//! `cargo run --release -p idempotent-examples --example overhead`.
//!
//! `overhead [MESSAGES] [PHASE]` runs MESSAGES messages per case (default 200 000).
//! PHASE (`direct`, `first` or `duplicate`) runs only the cases up to that one, once,
//! on a current-thread runtime, without timing: for instruction counts, e.g.
//! `valgrind --tool=callgrind overhead 20000 first` minus the same with `direct`,
//! divided by 20 000, is the cost of one first delivery.

use idempotent_runtime::{Error, MemoryStore, idempotent};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static MEMORY: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

#[idempotent(key = "key", store = MEMORY, scope = "overhead")]
async fn on_memory(key: &str) -> Result<u32, Error> {
    Ok(key.len() as u32)
}

async fn direct(key: &str) -> Result<u32, Error> {
    Ok(key.len() as u32)
}

#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Phase {
    Direct,
    First,
    Duplicate,
}

/// Nanoseconds and allocations per message of each case.
struct Figures {
    direct: f64,
    first: (f64, f64),
    duplicate: (f64, f64),
}

async fn run(keys: &[String], upto: Phase) -> Figures {
    let n = keys.len() as f64;
    let t = Instant::now();
    for k in keys {
        std::hint::black_box(direct(k).await.unwrap());
    }
    let direct = t.elapsed().as_nanos() as f64 / n;
    let mut figures = Figures {
        direct,
        first: (0.0, 0.0),
        duplicate: (0.0, 0.0),
    };
    for (phase, slot) in [
        (Phase::First, &mut figures.first),
        (Phase::Duplicate, &mut figures.duplicate),
    ] {
        if phase > upto {
            break;
        }
        let a = ALLOCS.load(Ordering::Relaxed);
        let t = Instant::now();
        for k in keys {
            std::hint::black_box(on_memory(k).await.unwrap());
        }
        let ns = t.elapsed().as_nanos() as f64 / n;
        *slot = (ns, (ALLOCS.load(Ordering::Relaxed) - a) as f64 / n);
    }
    figures
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = || -> ! {
        eprintln!("usage: overhead [MESSAGES [direct|first|duplicate]]");
        std::process::exit(2)
    };
    let n: usize = args
        .next()
        .map_or(Ok(200_000), |a| a.parse())
        .unwrap_or_else(|_| usage());
    let phase = args.next().map(|p| match p.as_str() {
        "direct" => Phase::Direct,
        "first" => Phase::First,
        "duplicate" => Phase::Duplicate,
        _ => usage(),
    });
    let current = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    if let Some(phase) = phase {
        let keys: Vec<String> = (0..n).map(|i| format!("k-{i}")).collect();
        current().block_on(run(&keys, phase));
        return;
    }
    println!(
        "handler future: {} bytes",
        std::mem::size_of_val(&on_memory("k"))
    );
    for (name, rt) in [
        ("current", current()),
        (
            "multi",
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap(),
        ),
    ] {
        // fresh keys per runtime, so every first delivery creates a record
        let keys: Vec<String> = (0..n).map(|i| format!("{}-k-{i}", &name[..1])).collect();
        let f = rt.block_on(run(&keys, Phase::Duplicate));
        println!("{name} runtime");
        println!("  direct call        {:7.0} ns", f.direct);
        println!(
            "  first delivery     {:7.0} ns  {:.1} allocations  (overhead {:.0} ns)",
            f.first.0,
            f.first.1,
            f.first.0 - f.direct
        );
        println!(
            "  duplicate          {:7.0} ns  {:.1} allocations",
            f.duplicate.0, f.duplicate.1
        );
    }
}
