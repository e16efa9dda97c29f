//! Fair turns for the store's jobs: one lane per tenant (an organization, or a client address for
//! work asked without a key), each lane's jobs in the order they came, and the lanes taking turns.
//!
//! Without it the jobs waited in one queue, in the order they came: one organization asking for
//! inbox pages on 256 connections made every other organization's smallest read wait ~1.2 s
//! behind its pages (RELIABILITY.md). Here a job waits for at most one job of each other lane
//! with work waiting, and a lane runs at most `per_lane_max` jobs at once (one per database
//! connection), so that few jobs are ahead of it for a connection either. A tenant alone still
//! has every connection.
//!
//! Plain data, no I/O: `store::jobs` holds it under a lock and spawns what
//! [`Lanes::start_next`] gives.

use std::collections::VecDeque;
use std::time::Instant;

/// One lane's jobs.
struct Lane<L, J> {
    tenant: L,
    /// Waiting, oldest first, with the moment each came.
    waiting: VecDeque<(Instant, J)>,
    /// Started and not yet finished.
    running: usize,
}

/// What [`Lanes::admit`] did with a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted<J> {
    /// It waits for its turn.
    Queued,
    /// It waits for its turn; this job, the newest of the lane with the most waiting, was put out
    /// to make room and is refused.
    Displaced(J),
    /// Every place is taken by lanes no longer than its own: it is refused.
    Refused(J),
}

/// Jobs waiting in lanes, and how many of each lane run.
///
/// The lanes with work are a list in the order they came, walked round by a cursor: a lane's
/// turn comes once per round. A list, not a map: it holds only the tenants with work now (a
/// handful, thousands only under a flood of tenants, where a walk costs microseconds against a
/// job's database work), and a map's hashing and table code measured ~3 KB of binary.
pub struct Lanes<L, J> {
    lanes: Vec<Lane<L, J>>,
    /// Where the walk for the next turn starts.
    cursor: usize,
    waiting: usize,
    waiting_max: usize,
    running: usize,
    running_max: usize,
    per_lane_max: usize,
}

impl<L: Copy + Eq, J> Lanes<L, J> {
    /// At most `running_max` jobs run at once, `per_lane_max` of one lane, and `waiting_max` wait.
    pub fn new(running_max: usize, per_lane_max: usize, waiting_max: usize) -> Self {
        Lanes {
            lanes: Vec::new(),
            cursor: 0,
            waiting: 0,
            waiting_max: waiting_max.max(1),
            running: 0,
            running_max: running_max.max(1),
            per_lane_max: per_lane_max.max(1),
        }
    }

    /// Queue `job` in `lane`. When every place is taken, the lane with the most jobs waiting gives
    /// up its newest if it would still have more waiting than `lane`; else `job` is refused.
    pub fn admit(&mut self, lane: L, job: J, now: Instant) -> Admitted<J> {
        let mut displaced = None;
        if self.waiting >= self.waiting_max {
            let own = self.find(lane).map_or(0, |i| self.lanes[i].waiting.len());
            let longest = self
                .lanes
                .iter_mut()
                .max_by_key(|l| l.waiting.len())
                .filter(|l| l.waiting.len() > own + 1);
            let Some(longest) = longest else {
                return Admitted::Refused(job);
            };
            // Still at least one waiting: the lane stays.
            displaced = longest.waiting.pop_back().map(|(_, j)| j);
            self.waiting -= 1;
        }
        let i = self.lane(lane);
        self.lanes[i].waiting.push_back((now, job));
        self.waiting += 1;
        match displaced {
            Some(j) => Admitted::Displaced(j),
            None => Admitted::Queued,
        }
    }

    /// The next job to start, counted as running until [`Lanes::finished`]: the oldest of the
    /// next lane in the round with a job waiting and fewer than `per_lane_max` running, unless as
    /// many jobs as may run already do.
    pub fn start_next(&mut self) -> Option<(L, Instant, J)> {
        if self.running >= self.running_max || self.waiting == 0 {
            return None;
        }
        let n = self.lanes.len();
        let per_lane_max = self.per_lane_max;
        let i = (0..n)
            .map(|k| (self.cursor + k) % n)
            .find(|&i| !self.lanes[i].waiting.is_empty() && self.lanes[i].running < per_lane_max)?;
        let l = &mut self.lanes[i];
        let (came, job) = l.waiting.pop_front()?;
        l.running += 1;
        self.cursor = i + 1;
        self.waiting -= 1;
        self.running += 1;
        Some((l.tenant, came, job))
    }

    /// A job of `lane` that [`Lanes::start_next`] gave has finished.
    pub fn finished(&mut self, lane: L) {
        if let Some(i) = self.find(lane) {
            let l = &mut self.lanes[i];
            l.running = l.running.saturating_sub(1);
            self.running = self.running.saturating_sub(1);
            self.forget_if_idle(i);
        }
    }

    /// Nothing waits or runs.
    pub fn idle(&self) -> bool {
        self.waiting == 0 && self.running == 0
    }

    fn find(&self, lane: L) -> Option<usize> {
        self.lanes.iter().position(|l| l.tenant == lane)
    }

    /// The index of `lane`, added at the end of the round if it has no work yet.
    fn lane(&mut self, lane: L) -> usize {
        self.find(lane).unwrap_or_else(|| {
            self.lanes.push(Lane {
                tenant: lane,
                waiting: VecDeque::new(),
                running: 0,
            });
            self.lanes.len() - 1
        })
    }

    /// A lane with nothing waiting or running leaves the round: the list holds only lanes with
    /// work. The others keep their order, and the cursor its place among them.
    fn forget_if_idle(&mut self, i: usize) {
        let l = &self.lanes[i];
        if l.waiting.is_empty() && l.running == 0 {
            self.lanes.remove(i);
            if i < self.cursor {
                self.cursor -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(running: usize, per_lane: usize, waiting: usize) -> Lanes<char, u32> {
        Lanes::new(running, per_lane, waiting)
    }

    fn start_all(l: &mut Lanes<char, u32>) -> Vec<(char, u32)> {
        std::iter::from_fn(|| l.start_next().map(|(lane, _, j)| (lane, j))).collect()
    }

    #[test]
    fn lanes_take_turns_and_each_keeps_its_order() {
        let mut l = lanes(100, 100, 100);
        let now = Instant::now();
        for j in 0..4 {
            assert_eq!(l.admit('a', j, now), Admitted::Queued);
        }
        assert_eq!(l.admit('b', 10, now), Admitted::Queued);
        assert_eq!(l.admit('b', 11, now), Admitted::Queued);
        assert_eq!(l.admit('c', 20, now), Admitted::Queued);
        assert_eq!(
            start_all(&mut l),
            [
                ('a', 0),
                ('b', 10),
                ('c', 20),
                ('a', 1),
                ('b', 11),
                ('a', 2),
                ('a', 3)
            ]
        );
        assert_eq!((l.waiting, l.running), (0, 7));
    }

    #[test]
    fn a_newcomer_waits_for_one_job_of_a_lane_with_thousands_waiting() {
        let mut l = lanes(2, 2, 10_000);
        let now = Instant::now();
        for j in 0..5_000 {
            l.admit('a', j, now);
        }
        assert_eq!(start_all(&mut l), [('a', 0), ('a', 1)]);
        l.admit('b', 99, now);
        // 'a' had the last turn: the first slot to come free is 'b''s.
        l.finished('a');
        assert_eq!(start_all(&mut l), [('b', 99)]);
        l.finished('a');
        assert_eq!(start_all(&mut l), [('a', 2)]);
    }

    #[test]
    fn a_lane_runs_at_most_its_share_while_slots_are_free() {
        let mut l = lanes(10, 3, 100);
        let now = Instant::now();
        for j in 0..6 {
            l.admit('a', j, now);
        }
        assert_eq!(start_all(&mut l), [('a', 0), ('a', 1), ('a', 2)]);
        assert_eq!((l.waiting, l.running), (3, 3));
        l.finished('a');
        assert_eq!(start_all(&mut l), [('a', 3)]);
        l.admit('b', 7, now);
        assert_eq!(start_all(&mut l), [('b', 7)]);
        for _ in 0..3 {
            l.finished('a');
        }
        assert_eq!(start_all(&mut l), [('a', 4), ('a', 5)]);
        assert_eq!(l.running, 3);
    }

    #[test]
    fn a_full_queue_makes_room_from_its_longest_lane_not_from_a_short_one() {
        let mut l = lanes(1, 1, 4);
        let now = Instant::now();
        for j in 0..3 {
            l.admit('a', j, now);
        }
        assert_eq!(l.admit('b', 10, now), Admitted::Queued);
        // Full: 'a' has three waiting, 'b' one; 'a' gives up its newest for 'b'.
        assert_eq!(l.admit('b', 11, now), Admitted::Displaced(2));
        // 'a' two, 'b' two: no lane is longer than b's by more than one.
        assert_eq!(l.admit('b', 12, now), Admitted::Refused(12));
        assert_eq!(l.admit('a', 3, now), Admitted::Refused(3));
        // A newcomer takes the place of the newest job of a lane with two.
        let made_room = l.admit('c', 20, now);
        assert!(
            [Admitted::Displaced(1), Admitted::Displaced(11)].contains(&made_room),
            "{made_room:?}"
        );
        assert_eq!(l.waiting, 4);
    }

    #[test]
    fn idle_lanes_are_forgotten() {
        let mut l = lanes(4, 4, 4);
        let now = Instant::now();
        l.admit('a', 1, now);
        l.admit('b', 2, now);
        assert_eq!(start_all(&mut l), [('a', 1), ('b', 2)]);
        l.finished('a');
        assert_eq!(l.lanes.len(), 1);
        assert!(!l.idle());
        l.finished('b');
        assert!(l.lanes.is_empty());
        assert!(l.idle());
        // A lane that comes back joins the round at its end.
        l.admit('c', 3, now);
        l.admit('a', 4, now);
        assert_eq!(start_all(&mut l), [('c', 3), ('a', 4)]);
    }
}
