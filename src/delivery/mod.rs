//! The delivery pool.
//!
//! - `target`: webhook URL rules and the SSRF policy.

pub mod target;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::ids::OrgId;

/// What the store holds of the delivery pool.
#[derive(Clone, Default)]
pub struct DeliveryHandle {
    wake: Arc<Notify>,
}

impl DeliveryHandle {
    /// An organization's webhook changed (`None`: any may have).
    pub fn org_changed(&self, _org: Option<OrgId>) {}

    /// Due work was written to the database: claim it now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}
