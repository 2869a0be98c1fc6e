//! What a handler emits: [`Outbox`], the list it fills during one execution, and
//! [`OutgoingMessage`], one message with its stable id.

use super::id::{Emission, message_id};
use crate::error::Error;
use crate::key::RecordKey;
use uuid::Uuid;

/// One message emitted through an [`Outbox`]: its stable id, destination, payload,
/// headers and optional ordering key.
///
/// The destination is what the [`Publisher`](super::Publisher) publishes to: a NATS
/// subject, a Kafka topic, a RabbitMQ exchange or queue, a Redis stream, a RocketMQ
/// topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    id: Uuid,
    destination: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    ordering_key: Option<String>,
}

impl OutgoingMessage {
    /// A message with this id, as a relay reads it back from an outbox table.
    pub fn new(id: Uuid, destination: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        OutgoingMessage {
            id,
            destination: destination.into(),
            payload: payload.into(),
            headers: Vec::new(),
            ordering_key: None,
        }
    }

    /// Adds a header (headers keep their order; a name may repeat).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the ordering key: messages with the same key are published one at a time,
    /// in emission order.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// The stable id ([`message_id`](super::message_id)); publishers put it in the
    /// broker's own dedup field.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Where the message goes.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The ordering key, if the handler gave one.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }
}

/// The messages one execution of a transactional handler emits.
///
/// A handler declared with `#[idempotent(tx = "tx", outbox = "outbox")]` takes an
/// `outbox: &mut Outbox` parameter. Before the body runs, the attribute binds the
/// outbox to the message's key (and empties it); each message the body emits gets an
/// id derived from the handler's scope, the key and the emission
/// ([`message_id`](super::message_id)), so a re-execution after a crash or a rollback
/// emits the same ids. When the body succeeds, the messages are written in the same
/// transaction as the business writes and the dedup row; nothing is sent before the
/// commit, and a rollback sends nothing. A duplicate that is answered from its record
/// emits nothing (the first execution's messages are already in the table).
///
/// ```
/// use idempotent_runtime::RecordKey;
/// use idempotent_runtime::outbox::Outbox;
///
/// let mut outbox = Outbox::new();
/// outbox.bind(&RecordKey::new("orders", "o-17").unwrap());
/// outbox.emit("payments.charge", br#"{"order":"o-17","cents":500}"#.to_vec())
///     .header("content-type", "application/json")
///     .ordering_key("customer-4");
/// outbox.emit_named("receipt", "mail.receipt", b"o-17".to_vec());
/// assert_eq!(outbox.messages().len(), 2);
/// assert!(outbox.check().is_ok());
/// ```
#[derive(Debug, Default)]
pub struct Outbox {
    origin: Option<RecordKey>,
    messages: Vec<OutgoingMessage>,
    positions: u32,
    /// The first mistake among the emissions, reported when the messages are written.
    invalid: Option<String>,
}

impl Outbox {
    /// An empty, unbound outbox, to pass to a handler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the outbox to the execution of `key` and empties it. The attribute calls
    /// this before the body; code that drives [`Idempotency`](crate::Idempotency) by
    /// hand calls it with the record key of the claim.
    pub fn bind(&mut self, key: &RecordKey) {
        self.origin = Some(key.clone());
        self.clear();
    }

    /// Drops what was emitted (the attribute does this when the body fails: nothing
    /// of a failed execution is written).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.positions = 0;
        self.invalid = None;
    }

    /// Emits a message to `destination`; its id comes from its position among the
    /// execution's unnamed emissions (0, 1, …). Keep the emissions in a deterministic
    /// order, or name them ([`emit_named`](Self::emit_named)), so that a re-execution
    /// gives each message the id it had.
    pub fn emit(
        &mut self,
        destination: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Emitted<'_> {
        let n = self.positions;
        self.positions = self.positions.saturating_add(1);
        self.push(Emission::Position(n), destination.into(), payload.into())
    }

    /// Emits a message whose id comes from `name`, unique within the execution: a
    /// message emitted only on some executions (a branch) keeps its id, and does not
    /// shift the ids of the others. Two emissions with one name are an error when the
    /// messages are written ([`Error::InvalidEmission`]).
    pub fn emit_named(
        &mut self,
        name: &str,
        destination: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Emitted<'_> {
        self.push(Emission::Named(name), destination.into(), payload.into())
    }

    fn push(
        &mut self,
        emission: Emission<'_>,
        destination: String,
        payload: Vec<u8>,
    ) -> Emitted<'_> {
        let id = match &self.origin {
            Some(key) => message_id(key, emission),
            None => {
                self.note_invalid(|| {
                    "a message was emitted through an outbox that no #[idempotent(outbox = …)] \
                     handler bound (Outbox::bind) so it has no stable id"
                        .to_owned()
                });
                Uuid::nil()
            }
        };
        if destination.is_empty() {
            self.note_invalid(|| "a message was emitted with an empty destination".to_owned());
        }
        if let Emission::Named(name) = emission
            && !id.is_nil()
            && self.messages.iter().any(|m| m.id == id)
        {
            self.note_invalid(|| format!("two messages were emitted with the name {name:?}"));
        }
        self.messages
            .push(OutgoingMessage::new(id, destination, payload));
        Emitted {
            message: self.messages.last_mut().expect("just pushed"),
        }
    }

    fn note_invalid(&mut self, reason: impl FnOnce() -> String) {
        if self.invalid.is_none() {
            self.invalid = Some(reason());
        }
    }

    /// The messages emitted so far, in emission order.
    pub fn messages(&self) -> &[OutgoingMessage] {
        &self.messages
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The key the outbox is bound to.
    pub fn origin(&self) -> Option<&RecordKey> {
        self.origin.as_ref()
    }

    /// [`Error::InvalidEmission`] for the first mistake among the emissions (an
    /// unbound outbox, an empty destination, a name used twice); the messages are
    /// written only when this is `Ok`.
    pub fn check(&self) -> Result<(), Error> {
        match &self.invalid {
            None => Ok(()),
            Some(reason) => Err(Error::InvalidEmission {
                reason: reason.clone(),
            }),
        }
    }

    /// Takes the emitted messages out, leaving the outbox empty and bound.
    pub fn take(&mut self) -> Vec<OutgoingMessage> {
        self.positions = 0;
        self.invalid = None;
        std::mem::take(&mut self.messages)
    }
}

/// A message just emitted: add headers or an ordering key.
#[derive(Debug)]
pub struct Emitted<'a> {
    message: &'a mut OutgoingMessage,
}

impl Emitted<'_> {
    /// Adds a header (headers keep their order; a name may repeat).
    pub fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.message.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the ordering key: messages with the same key are published one at a time,
    /// in emission order.
    pub fn ordering_key(self, key: impl Into<String>) -> Self {
        self.message.ordering_key = Some(key.into());
        self
    }

    /// The message's stable id.
    pub fn id(&self) -> Uuid {
        self.message.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(key: &str) -> Outbox {
        let mut o = Outbox::new();
        o.bind(&RecordKey::new("s", key).unwrap());
        o
    }

    #[test]
    fn a_re_execution_emits_the_same_ids() {
        let ids = |o: &mut Outbox| {
            o.emit("a", b"1".to_vec());
            o.emit_named("x", "b", b"2".to_vec());
            o.emit("a", b"3".to_vec());
            o.messages().iter().map(|m| m.id()).collect::<Vec<_>>()
        };
        let first = ids(&mut bound("k"));
        assert_eq!(first, ids(&mut bound("k")));
        assert_ne!(first, ids(&mut bound("k2")));
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn a_named_emission_does_not_shift_the_positions() {
        let mut with = bound("k");
        with.emit_named("only-sometimes", "d", Vec::new());
        with.emit("d", Vec::new());
        let mut without = bound("k");
        without.emit("d", Vec::new());
        assert_eq!(with.messages()[1].id(), without.messages()[0].id());
    }

    #[test]
    fn mistakes_are_reported_when_checked() {
        let mut o = bound("k");
        o.emit_named("n", "d", Vec::new());
        o.emit_named("n", "d", Vec::new());
        let err = o.check().unwrap_err().to_string();
        assert!(err.contains("\"n\""), "{err}");

        let mut o = bound("k");
        o.emit("", Vec::new());
        assert!(
            o.check()
                .unwrap_err()
                .to_string()
                .contains("empty destination")
        );

        let mut unbound = Outbox::new();
        unbound.emit("d", Vec::new());
        assert!(unbound.check().unwrap_err().to_string().contains("bind"));
    }

    #[test]
    fn binding_again_starts_a_new_execution() {
        let mut o = bound("k");
        o.emit_named("n", "d", Vec::new());
        o.emit("", Vec::new());
        o.bind(&RecordKey::new("s", "k").unwrap());
        assert!(o.is_empty());
        assert!(o.check().is_ok());
        o.emit_named("n", "d", Vec::new());
        assert!(o.check().is_ok());
    }

    #[test]
    fn headers_and_ordering_key_are_kept() {
        let mut o = bound("k");
        let id = o
            .emit("d", b"p".to_vec())
            .header("h", "1")
            .header("h", "2")
            .ordering_key("c-1")
            .id();
        let m = &o.messages()[0];
        assert_eq!(m.id(), id);
        assert_eq!(
            m.headers(),
            [("h".into(), "1".into()), ("h".into(), "2".into())]
        );
        assert_eq!(m.ordering_key(), Some("c-1"));
        assert_eq!(m.payload(), b"p");
    }
}
