use idempotent_runtime::idempotent;

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Option<u64> {
    let _ = &msg.id;
    Some(1)
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
