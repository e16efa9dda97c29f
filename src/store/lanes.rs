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

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

/// One lane's jobs.
struct Lane<L, J> {
    tenant: L,
    /// Waiting, oldest first, with the moment each came.
    waiting: VecDeque<(Instant, J)>,
    /// Started and not yet finished.
    running: usize,
    /// In the round ([`Lanes::round`]).
    in_round: bool,
    /// Its place in `Lanes::by_waiting[waiting.len()]`, while it has jobs waiting.
    place: usize,
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
/// The lanes that may start a job now (one waiting, fewer than `per_lane_max` running) stand in
/// a round, in the order they became able to: the first starts its oldest job and goes to the
/// round's end if it may start another, so a lane's turn comes once per round. Each step costs
/// the same however many tenants have work (a map from tenant to lane, and the lanes listed by
/// how many jobs wait, for the full queue's choice). The first version walked a list of the
/// lanes: a turn took 7.6 µs with 4,096 tenants waiting (a flood of bad keys from as many
/// addresses), under the lock the asking cores take; now 0.17 µs, and 0.14 µs with 16 tenants
/// against the list's 0.09 (`cargo bench --bench micro -- lanes`; 6.3 KB of binary).
pub struct Lanes<L, J> {
    /// Lanes with work (waiting or running), in slots that are reused (`free`: those of lanes
    /// forgotten, empty).
    slots: Vec<Lane<L, J>>,
    free: Vec<usize>,
    by_tenant: HashMap<L, usize>,
    /// Lanes that may start a job now, in the order of their turns.
    round: VecDeque<usize>,
    /// Lanes with jobs waiting, by how many: `by_waiting[n]` holds those with `n` (for a full
    /// queue's choice); `most` is the largest `n` held.
    by_waiting: Vec<Vec<usize>>,
    most: usize,
    waiting: usize,
    waiting_max: usize,
    running: usize,
    running_max: usize,
    per_lane_max: usize,
}

impl<L: Copy + Eq + Hash, J> Lanes<L, J> {
    /// At most `running_max` jobs run at once, `per_lane_max` of one lane, and `waiting_max` wait.
    pub fn new(running_max: usize, per_lane_max: usize, waiting_max: usize) -> Self {
        Lanes {
            slots: Vec::new(),
            free: Vec::new(),
            by_tenant: HashMap::new(),
            round: VecDeque::new(),
            by_waiting: Vec::new(),
            most: 0,
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
            let own = self
                .by_tenant
                .get(&lane)
                .map_or(0, |&i| self.slots[i].waiting.len());
            let longest = self
                .by_waiting
                .get(self.most)
                .and_then(|lanes| lanes.last().copied())
                .filter(|_| self.most > own + 1);
            let Some(longest) = longest else {
                return Admitted::Refused(job);
            };
            // Still at least one waiting: the lane stays, in the round if it was.
            displaced = self.take_waiting(longest, false).map(|(_, j)| j);
        }
        let i = self.slot_of(lane);
        let waiting = &mut self.slots[i].waiting;
        let before = waiting.len();
        waiting.push_back((now, job));
        self.waiting += 1;
        self.relist(i, before);
        self.join_round_if_able(i);
        match displaced {
            Some(j) => Admitted::Displaced(j),
            None => Admitted::Queued,
        }
    }

    /// The next job to start, counted as running until [`Lanes::finished`]: the oldest of the
    /// lane whose turn it is, unless as many jobs as may run already do.
    pub fn start_next(&mut self) -> Option<(L, Instant, J)> {
        if self.running >= self.running_max {
            return None;
        }
        let (i, came, job) = loop {
            let i = self.round.pop_front()?;
            self.slots[i].in_round = false;
            if let Some((came, job)) = self.take_waiting(i, true) {
                break (i, came, job);
            }
        };
        let l = &mut self.slots[i];
        l.running += 1;
        let tenant = l.tenant;
        self.running += 1;
        self.join_round_if_able(i);
        Some((tenant, came, job))
    }

    /// A job of `lane` that [`Lanes::start_next`] gave has finished.
    pub fn finished(&mut self, lane: L) {
        let Some(&i) = self.by_tenant.get(&lane) else {
            return;
        };
        let l = &mut self.slots[i];
        l.running = l.running.saturating_sub(1);
        self.running = self.running.saturating_sub(1);
        self.join_round_if_able(i);
        self.forget_if_idle(i);
    }

    /// Nothing waits or runs.
    pub fn idle(&self) -> bool {
        self.waiting == 0 && self.running == 0
    }

    /// The slot of `lane`, made for it if it has no work yet.
    fn slot_of(&mut self, lane: L) -> usize {
        if let Some(&i) = self.by_tenant.get(&lane) {
            return i;
        }
        let new = Lane {
            tenant: lane,
            waiting: VecDeque::new(),
            running: 0,
            in_round: false,
            place: 0,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = new;
                i
            }
            None => {
                self.slots.push(new);
                self.slots.len() - 1
            }
        };
        self.by_tenant.insert(lane, i);
        i
    }

    /// Lane `i` had `before` jobs waiting and now has one more or one fewer: move it to its
    /// list in `by_waiting`.
    fn relist(&mut self, i: usize, before: usize) {
        let after = self.slots[i].waiting.len();
        if before > 0 {
            let lanes = &mut self.by_waiting[before];
            let place = self.slots[i].place;
            lanes.swap_remove(place);
            if let Some(&moved) = lanes.get(place) {
                self.slots[moved].place = place;
            }
        }
        if after > 0 {
            if self.by_waiting.len() <= after {
                self.by_waiting.resize_with(after + 1, Vec::new);
            }
            self.slots[i].place = self.by_waiting[after].len();
            self.by_waiting[after].push(i);
        }
        self.most = self.most.max(after);
        while self.most > 0 && self.by_waiting[self.most].is_empty() {
            self.most -= 1;
        }
    }

    /// Take lane `i`'s oldest waiting job (`oldest`), or its newest.
    fn take_waiting(&mut self, i: usize, oldest: bool) -> Option<(Instant, J)> {
        let waiting = &mut self.slots[i].waiting;
        let before = waiting.len();
        let taken = if oldest {
            waiting.pop_front()
        } else {
            waiting.pop_back()
        };
        if taken.is_some() {
            self.waiting -= 1;
            self.relist(i, before);
        }
        taken
    }

    /// Lane `i` joins the end of the round if it may start a job and is not in it.
    fn join_round_if_able(&mut self, i: usize) {
        let per_lane_max = self.per_lane_max;
        let l = &mut self.slots[i];
        if !l.in_round && !l.waiting.is_empty() && l.running < per_lane_max {
            l.in_round = true;
            self.round.push_back(i);
        }
    }

    /// A lane with nothing waiting or running is forgotten: only lanes with work are kept.
    fn forget_if_idle(&mut self, i: usize) {
        let l = &self.slots[i];
        if l.waiting.is_empty() && l.running == 0 && !l.in_round {
            self.by_tenant.remove(&l.tenant);
            self.free.push(i);
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

    /// Thousands of tenants take turns as a handful do: each tenant's first job, in the order
    /// the tenants came, then each one's second; a full queue makes room from a longest lane,
    /// and lanes forgotten leave their places to newcomers.
    #[test]
    fn thousands_of_tenants_take_turns_in_the_order_they_came() {
        let mut l: Lanes<u32, u32> = Lanes::new(usize::MAX, 1, 10_001);
        let now = Instant::now();
        for t in 0..5_000 {
            l.admit(t, 2 * t, now);
            l.admit(t, 2 * t + 1, now);
        }
        // Full: tenant 7 has two waiting, the newcomer none.
        assert_eq!(l.admit(9_999, 0, now), Admitted::Queued);
        let made_room = l.admit(10_000, 0, now);
        assert!(
            matches!(made_room, Admitted::Displaced(j) if j % 2 == 1),
            "{made_room:?}"
        );
        let mut first = Vec::new();
        while let Some((t, _, j)) = l.start_next() {
            first.push((t, j));
        }
        // One each (a lane runs one at a time here), in the order the tenants came.
        assert_eq!(first.len(), 5_002);
        assert!(first[..5_000]
            .iter()
            .enumerate()
            .all(|(i, &(t, j))| t == i as u32 && j == 2 * t));
        for t in 0..5_000 {
            l.finished(t);
        }
        l.finished(9_999);
        l.finished(10_000);
        let second: Vec<_> = std::iter::from_fn(|| l.start_next())
            .map(|(t, _, j)| (t, j))
            .collect();
        assert_eq!(second.len(), 4_999);
        assert!(second.iter().all(|&(t, j)| j == 2 * t + 1));
        assert!(second.windows(2).all(|w| w[0].0 < w[1].0));
        for (t, _) in second {
            l.finished(t);
        }
        assert!(l.idle() && l.by_tenant.is_empty() && l.most == 0);
        // The slots are reused.
        l.admit(1, 1, now);
        assert_eq!(l.slots.len(), 5_002);
    }

    /// Any mix of admits, starts and ends keeps the counts and the lists by waiting count true
    /// to the lanes (a fixed pseudo-random sequence, checked against the lanes after each step).
    #[test]
    fn the_lists_by_waiting_count_stay_true_to_the_lanes() {
        let mut l: Lanes<u8, u32> = Lanes::new(5, 2, 40);
        let now = Instant::now();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut running: Vec<u8> = Vec::new();
        for step in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            match seed % 3 {
                0 | 1 => {
                    l.admit((seed >> 8) as u8 % 12, step, now);
                }
                _ => match l.start_next() {
                    Some((t, _, _)) => running.push(t),
                    None if !running.is_empty() => {
                        let t = running.swap_remove((seed >> 8) as usize % running.len());
                        l.finished(t);
                    }
                    None => {}
                },
            }
            let live: Vec<usize> = l.by_tenant.values().copied().collect();
            let waiting: usize = live.iter().map(|&i| l.slots[i].waiting.len()).sum();
            let most = live.iter().map(|&i| l.slots[i].waiting.len()).max();
            assert_eq!(waiting, l.waiting, "step {step}");
            assert!(l.waiting <= 40 && l.running == running.len());
            assert_eq!(most.unwrap_or(0), l.most, "step {step}");
            for &i in &live {
                let n = l.slots[i].waiting.len();
                if n > 0 {
                    assert_eq!(l.by_waiting[n][l.slots[i].place], i, "step {step}");
                }
            }
            let listed: usize = l.by_waiting.iter().skip(1).map(Vec::len).sum();
            assert_eq!(
                listed,
                live.iter()
                    .filter(|&&i| !l.slots[i].waiting.is_empty())
                    .count()
            );
        }
    }

    #[test]
    fn idle_lanes_are_forgotten() {
        let mut l = lanes(4, 4, 4);
        let now = Instant::now();
        l.admit('a', 1, now);
        l.admit('b', 2, now);
        assert_eq!(start_all(&mut l), [('a', 1), ('b', 2)]);
        l.finished('a');
        assert_eq!(l.by_tenant.len(), 1);
        assert!(!l.idle());
        l.finished('b');
        assert!(l.by_tenant.is_empty());
        assert!(l.most == 0 && l.round.is_empty());
        assert!(l.idle());
        // A lane that comes back joins the round at its end.
        l.admit('c', 3, now);
        l.admit('a', 4, now);
        assert_eq!(start_all(&mut l), [('c', 3), ('a', 4)]);
    }
}
