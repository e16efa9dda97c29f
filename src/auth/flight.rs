//! Single flight: while one task verifies a key, the others with the same key wait for its answer
//! instead of each asking again. One type for both places that need it: an ingress core (so a burst
//! of requests with a new key sends one job to the store) and the store pool (so a node runs Argon2
//! once per key, whichever cores ask).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::cache::KeyHash;

/// The verifications in progress, by key hash; `V` is the answer the waiting ones get.
pub struct Flights<V> {
    in_flight: Mutex<HashMap<KeyHash, Vec<oneshot::Sender<V>>>>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Flights {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

/// Whether a caller verifies a key or waits for another that already does.
pub enum Flight<'f, V: Clone> {
    /// Verify, then [`Leader::land`] the answer for the waiting ones.
    Leader(Leader<'f, V>),
    /// Another caller verifies this key: its answer arrives here, or the channel closes when it
    /// gave up (then verify alone).
    Follower(oneshot::Receiver<V>),
}

/// The caller verifying a key. Dropped without landing (an error, a cancelled request), it closes
/// the waiting ones' channels so they try themselves.
pub struct Leader<'f, V: Clone> {
    flights: &'f Flights<V>,
    hash: KeyHash,
    landed: bool,
}

impl<V: Clone> Leader<'_, V> {
    /// Hand the answer to every caller waiting for this key.
    pub fn land(mut self, answer: &V) {
        self.landed = true;
        self.flights.land(self.hash, Some(answer));
    }
}

impl<V: Clone> Drop for Leader<'_, V> {
    fn drop(&mut self) {
        if !self.landed {
            self.flights.land(self.hash, None);
        }
    }
}

impl<V: Clone> Flights<V> {
    /// Lead the verification of `hash`, or follow the one in progress.
    pub fn join(&self, hash: KeyHash) -> Flight<'_, V> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&hash) {
            Some(waiting) => {
                let (tx, rx) = oneshot::channel();
                waiting.push(tx);
                Flight::Follower(rx)
            }
            None => {
                map.insert(hash, Vec::new());
                Flight::Leader(Leader {
                    flights: self,
                    hash,
                    landed: false,
                })
            }
        }
    }

    fn land(&self, hash: KeyHash, answer: Option<&V>) {
        let waiting = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
        for tx in waiting.into_iter().flatten() {
            if let Some(a) = answer {
                let _ = tx.send(a.clone());
            }
        }
    }

    /// Verifications in progress.
    pub fn len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leader_per_key_and_its_answer_reaches_every_follower() {
        let f: Flights<Result<u32, ()>> = Flights::default();
        let Flight::Leader(leader) = f.join(7) else {
            panic!("first is the leader")
        };
        let Flight::Follower(mut a) = f.join(7) else {
            panic!("second follows")
        };
        let Flight::Follower(b) = f.join(7) else {
            panic!("third follows")
        };
        assert!(
            matches!(f.join(8), Flight::Leader(_)),
            "other keys are not affected"
        );
        leader.land(&Ok(42));
        assert_eq!(a.try_recv().unwrap(), Ok(42));
        drop(b);
        assert!(f.is_empty(), "a landed flight is over");
        // A leader that gives up closes its followers' channels: they verify alone.
        let Flight::Leader(leader) = f.join(7) else {
            panic!()
        };
        let Flight::Follower(mut c) = f.join(7) else {
            panic!()
        };
        drop(leader);
        assert!(c.try_recv().is_err());
        assert!(matches!(f.join(7), Flight::Leader(_)));
    }
}
