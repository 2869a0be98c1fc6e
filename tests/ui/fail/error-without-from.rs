use idempotent_runtime::idempotent;

struct Msg {
    id: String,
}

#[derive(Debug)]
enum AppError {
    Db,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Result<(), AppError> {
    if msg.id.is_empty() {
        return Err(AppError::Db);
    }
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
