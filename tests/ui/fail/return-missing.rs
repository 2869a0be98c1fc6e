use idempotent_runtime::idempotent;

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) {
    let _ = &msg.id;
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
