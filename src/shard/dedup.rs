//! The recent-dedup window: a bounded map from (organization, dedup id) to the event that holds it,
//! so a repeated `dedup_id` is answered 409 without a query.
//!
//! The database's unique index is the truth; the window only short-circuits what it knows to be
//! committed. While the first event with a dedup id is still in flight (`Pending`) a repeat goes to
//! the database, which settles the race exactly. Oldest entries are forgotten first.

use std::collections::{HashMap, VecDeque};

use crate::flow::event::DedupKey;
use crate::ids::EventId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Pending,
    Committed(EventId),
}

/// What the window knows about a dedup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Committed as this event: answer 409.
    Committed(EventId),
    /// Not known to be committed: let the database decide.
    Unknown,
}

/// A bounded, first-in-first-out window of recent dedup ids.
#[derive(Debug)]
pub struct DedupWindow {
    map: HashMap<DedupKey, Entry, ahash::RandomState>,
    order: VecDeque<DedupKey>,
    capacity: usize,
}

impl DedupWindow {
    /// A window remembering at most `capacity` keys (0 disables it).
    pub fn new(capacity: usize) -> Self {
        DedupWindow {
            map: HashMap::with_capacity_and_hasher(capacity.min(4096), ahash::RandomState::new()),
            order: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
        }
    }

    /// Look `key` up; a miss or a pending entry records the key as pending.
    pub fn check_and_reserve(&mut self, key: DedupKey) -> Seen {
        if self.capacity == 0 {
            return Seen::Unknown;
        }
        match self.map.get(&key) {
            Some(Entry::Committed(id)) => Seen::Committed(*id),
            Some(Entry::Pending) => Seen::Unknown,
            None => {
                self.insert(key, Entry::Pending);
                Seen::Unknown
            }
        }
    }

    /// The database settled `key`: committed as `Some(event)`, or not written at all (`None`).
    pub fn settle(&mut self, key: DedupKey, outcome: Option<EventId>) {
        match outcome {
            Some(id) => {
                if let Some(e) = self.map.get_mut(&key) {
                    *e = Entry::Committed(id);
                } else if self.capacity > 0 {
                    self.insert(key, Entry::Committed(id));
                }
            }
            None => {
                if self.map.get(&key) == Some(&Entry::Pending) {
                    self.map.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, key: DedupKey, entry: Entry) {
        while self.order.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(key, entry);
        self.order.push_back(key);
    }

    /// Forget every key (the database may no longer hold what the window says it does).
    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id(n: u128) -> EventId {
        EventId(Uuid::from_u128(n))
    }

    #[test]
    fn committed_keys_are_answered_pending_ones_are_not() {
        let mut w = DedupWindow::new(10);
        assert_eq!(w.check_and_reserve(1), Seen::Unknown);
        // Still in flight: a repeat must go to the database.
        assert_eq!(w.check_and_reserve(1), Seen::Unknown);
        w.settle(1, Some(id(7)));
        assert_eq!(w.check_and_reserve(1), Seen::Committed(id(7)));
    }

    #[test]
    fn cleared_keys_go_to_the_database_and_settle_as_before() {
        let mut w = DedupWindow::new(10);
        w.check_and_reserve(1);
        w.settle(1, Some(id(7)));
        w.check_and_reserve(2);
        w.clear();
        assert!(w.is_empty());
        assert_eq!(w.check_and_reserve(1), Seen::Unknown);
        // A key in flight when the window was cleared is remembered once it commits.
        w.settle(2, Some(id(8)));
        assert_eq!(w.check_and_reserve(2), Seen::Committed(id(8)));
    }

    #[test]
    fn a_failed_write_forgets_the_key() {
        let mut w = DedupWindow::new(10);
        w.check_and_reserve(1);
        w.settle(1, None);
        assert!(w.is_empty());
        // A committed entry is never forgotten by a later failure of a repeat.
        w.settle(2, Some(id(9)));
        w.settle(2, None);
        assert_eq!(w.check_and_reserve(2), Seen::Committed(id(9)));
    }

    #[test]
    fn oldest_keys_go_first_and_the_size_stays_bounded() {
        let mut w = DedupWindow::new(3);
        for k in 0..5 {
            w.check_and_reserve(k);
            w.settle(k, Some(id(k)));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.check_and_reserve(0), Seen::Unknown);
        assert_eq!(w.check_and_reserve(4), Seen::Committed(id(4)));
        assert!(w.len() <= 3);
    }

    #[test]
    fn zero_capacity_disables_the_window() {
        let mut w = DedupWindow::new(0);
        w.check_and_reserve(1);
        w.settle(1, Some(id(1)));
        assert_eq!(w.check_and_reserve(1), Seen::Unknown);
        assert!(w.is_empty());
    }
}
