//! Weights too big for a round message: a device asks for the chunks it lacks
//! (`fl-fetch`, sealed like an update), and gets them on its `fl/chunk` topic, checked there
//! against the digests of the signed round header. Only the current version is served (the
//! only one in memory); a device asking for an older one has a newer round message waiting.

use protocol::v1::fl::{FetchRequest, chunks};
use protocol::v1::topics;

use super::{Engine, Fleet};
use crate::action::Action;

impl Engine {
    /// A device's request for chunks of a task's global weights.
    pub fn on_fetch(&mut self, device: &str, body: &[u8], fleet: &dyn Fleet) -> Vec<Action> {
        let req = match FetchRequest::decode(body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%device, error = %e, "malformed weight fetch dropped");
                return Vec::new();
            }
        };
        let Some(t) = self.tasks.get_mut(&req.task) else {
            tracing::debug!(%device, task = %req.task, "weight fetch for an unknown task");
            return Vec::new();
        };
        if req.version != t.state.version || t.global.len() <= chunks::MAX_INLINE_WEIGHTS {
            tracing::debug!(%device, task = %req.task, version = req.version, current = t.state.version, "weight fetch for a version not served");
            return Vec::new();
        }
        let member = fleet
            .members(&t.state.spec.members)
            .iter()
            .any(|(d, _)| d == device);
        if !member {
            tracing::warn!(%device, task = %req.task, "weight fetch from a device that is not a member of the task; refused");
            return Vec::new();
        }
        let version = t.state.version;
        let blob = super::cached_blob(&mut t.blob, version, &t.global);
        let mut out = Vec::with_capacity(req.indexes.len());
        let mut bytes = 0u64;
        for &index in &req.indexes {
            if index as usize >= blob.chunks.len() {
                continue;
            }
            let payload = chunks::encode_chunk(&req.task, version, index, &t.global, blob);
            bytes += payload.len() as u64;
            out.push(Action::Publish {
                topic: topics::fl_chunk(device),
                payload,
                retain: false,
            });
        }
        t.state.current.bytes_out += bytes;
        t.state.totals.bytes_out += bytes;
        self.dirty.insert(req.task);
        out
    }
}
