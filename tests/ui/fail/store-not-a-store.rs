use idempotent_runtime::{Error, idempotent};
use std::collections::HashMap;
use std::sync::LazyLock;

struct Msg {
    id: String,
}

static SEEN: LazyLock<HashMap<String, String>> = LazyLock::new(HashMap::new);

#[idempotent(key = "msg.id", store = SEEN)]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
