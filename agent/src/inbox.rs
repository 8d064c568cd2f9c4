//! Incoming MQTT messages, routed by topic filter to the parts of the agent that asked for
//! them (the deploy task, pipeline `mqtt` sources).
//!
//! A part calls [`Inbox::subscribe`] and reads its [`Subscription`]; dropping the
//! subscription removes the route. The uplink subscribes on the broker to every filter in
//! the inbox on each (clean-session) connection and follows changes while connected.
//!
//! **Invariant:** delivery never blocks the uplink's event loop: a full subscriber channel
//! drops the message and counts it (deployments ask for lost chunks again; live sources are
//! lossy by nature). **Boundary:** the uplink delivers; anything in the agent subscribes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

/// One message received from the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: bytes::Bytes,
    /// Delivered because it was retained on the broker (not published just now).
    pub retain: bool,
}

#[derive(Default)]
struct Routes {
    next_id: u64,
    routes: Vec<Route>,
}

struct Route {
    id: u64,
    filter: String,
    tx: mpsc::Sender<Incoming>,
    dropped: Arc<AtomicU64>,
}

/// The routing table, shared by the uplink and the subscribers.
#[derive(Clone, Default)]
pub struct Inbox {
    routes: Arc<Mutex<Routes>>,
    changed: Arc<Notify>,
    unrouted: Arc<AtomicU64>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("filters", &self.filters())
            .finish()
    }
}

/// A route's receiving end; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    ids: Vec<u64>,
    inbox: Inbox,
    pub rx: mpsc::Receiver<Incoming>,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// Messages dropped because this subscriber's channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut r = self.inbox.lock();
        r.routes.retain(|route| !self.ids.contains(&route.id));
        drop(r);
        self.inbox.changed.notify_one();
    }
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes messages matching `filter` to a new channel of `capacity` messages.
    pub fn subscribe(&self, filter: &str, capacity: usize) -> Subscription {
        self.subscribe_all(&[filter], capacity)
    }

    /// Routes messages matching any of `filters` to one new channel (a message matching
    /// several of them arrives once per filter).
    pub fn subscribe_all<S: AsRef<str>>(&self, filters: &[S], capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut r = self.lock();
        let mut ids = Vec::with_capacity(filters.len());
        for f in filters {
            r.next_id += 1;
            let id = r.next_id;
            ids.push(id);
            r.routes.push(Route {
                id,
                filter: f.as_ref().to_owned(),
                tx: tx.clone(),
                dropped: dropped.clone(),
            });
        }
        drop(r);
        self.changed.notify_one();
        Subscription {
            ids,
            inbox: self.clone(),
            rx,
            dropped,
        }
    }

    /// Every filter someone subscribed to.
    pub fn filters(&self) -> BTreeSet<String> {
        self.lock()
            .routes
            .iter()
            .map(|r| r.filter.clone())
            .collect()
    }

    /// Resolves when a subscription was added or dropped since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Hands a message to every matching subscriber without waiting; returns how many
    /// matched.
    pub fn deliver(&self, msg: Incoming) -> usize {
        let r = self.lock();
        let mut matched = 0;
        for route in r
            .routes
            .iter()
            .filter(|r| topic_matches(&r.filter, &msg.topic))
        {
            matched += 1;
            if route.tx.try_send(msg.clone()).is_err() {
                let n = route.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(filter = %route.filter, topic = %msg.topic, dropped = n + 1, "subscriber is not keeping up; dropping incoming messages");
                }
            }
        }
        if matched == 0 {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
        }
        matched
    }

    /// Messages that matched no subscription (e.g. arrived just after an unsubscribe).
    pub fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest); topics starting with `$` match
/// only filters that name that first level.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("#", "x/y"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a/c"));
        assert!(!topic_matches("a/b/c", "a/b"));
    }

    #[test]
    fn routes_to_matching_subscribers_drops_when_full_and_unsubscribes_on_drop() {
        let inbox = Inbox::default();
        let mut a = inbox.subscribe("s/+", 1);
        let b = inbox.subscribe("s/x", 8);
        let msg = |t: &str| Incoming {
            topic: t.into(),
            payload: bytes::Bytes::from_static(b"1"),
            retain: false,
        };
        assert_eq!(inbox.deliver(msg("s/x")), 2);
        assert_eq!(inbox.deliver(msg("s/x")), 2);
        assert_eq!(a.dropped(), 1, "capacity 1");
        assert_eq!(a.rx.try_recv().expect("first").topic, "s/x");
        assert_eq!(inbox.filters().len(), 2);
        drop(b);
        assert_eq!(inbox.filters().into_iter().collect::<Vec<_>>(), vec!["s/+"]);
        assert_eq!(inbox.deliver(msg("t")), 0);
        assert_eq!(inbox.unrouted(), 1);
    }
}
