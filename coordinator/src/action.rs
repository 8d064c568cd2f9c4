//! What an I/O-free engine (deployment rollouts, federated rounds) asks the service to do.
//! Its own module because every engine returns it and the service carries it out: no engine
//! should have to import another engine to speak.

use crate::event::Event;

/// Something the service must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish at QoS 1. An empty retained payload clears the topic's retained message.
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// Journal and log.
    Event(Event),
}
