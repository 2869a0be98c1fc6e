//! Per-message cost of the attribute and protocol on the memory store, and the
//! allocations it makes: `cargo run --release -p idempotent-examples --example overhead`.

use idempotent_runtime::{Error, MemoryStore, idempotent};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

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

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = 200_000;
        let keys: Vec<String> = (0..n).map(|i| format!("k-{i}")).collect();
        let t = std::time::Instant::now();
        for k in &keys {
            std::hint::black_box(direct(k).await.unwrap());
        }
        let raw = t.elapsed().as_nanos() as f64 / n as f64;
        let a = ALLOCS.load(Ordering::Relaxed);
        let t = std::time::Instant::now();
        for k in &keys {
            std::hint::black_box(on_memory(k).await.unwrap());
        }
        let first = t.elapsed().as_nanos() as f64 / n as f64;
        let a_first = (ALLOCS.load(Ordering::Relaxed) - a) as f64 / n as f64;
        let a = ALLOCS.load(Ordering::Relaxed);
        let t = std::time::Instant::now();
        for k in &keys {
            std::hint::black_box(on_memory(k).await.unwrap());
        }
        let dup = t.elapsed().as_nanos() as f64 / n as f64;
        let a_dup = (ALLOCS.load(Ordering::Relaxed) - a) as f64 / n as f64;
        println!("direct call        {raw:7.0} ns");
        println!("first delivery     {first:7.0} ns  {a_first:.1} allocations");
        println!("duplicate          {dup:7.0} ns  {a_dup:.1} allocations");
    });
}
