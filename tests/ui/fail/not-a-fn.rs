use idempotent_runtime::idempotent;

#[idempotent(key = "msg.id")]
struct Handler {
    id: String,
}

fn main() {
    let h = Handler { id: String::new() };
    let _ = h.id;
}
