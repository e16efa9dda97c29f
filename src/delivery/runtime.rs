//! What this node keeps in memory per endpoint: its share of delivery concurrency, the
//! deliveries it holds, its circuit breaker and its rate limiter. The breaker and the limiter are
//! plain values (times passed in) so their rules are tested without clocks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

use crate::config::UNHEARD_WAIT_MAX;
use crate::flow::answer::Circuit;
use crate::ids::{Micros, OrgId};

/// How long a delivery waits before looking again while another one probes a half-open circuit,
/// at most: the probe's end wakes it sooner (`changed`).
pub const PROBE_WAIT: Duration = Duration::from_secs(1);

/// How long an endpoint's deliveries wait after the server could not send one (see
/// [`UnsentSpell`]), at first; each failure in a row doubles it, up to [`UNSENT_WAIT_MAX`].
pub const UNSENT_WAIT_MIN: Duration = Duration::from_secs(1);
/// The longest wait between tries while the server can't send to an endpoint.
pub const UNSENT_WAIT_MAX: Duration = Duration::from_secs(30);

/// After this long with nothing taken nor reserved, this node forgets its view of an endpoint's
/// bucket (and the endpoint's runtime, when nothing else keeps it): whatever debt its own spending
/// left in the cluster's bucket (a minute's worth at most) is repaid by then, and the fresh view
/// it starts with when it delivers there again is empty until its first report gives it its part.
pub const BUCKET_FORGET_AFTER: Duration = Duration::from_secs(61);

/// A circuit breaker: `threshold` consecutive failures open it for `open_for`; then one attempt
/// (the probe) goes through; its success closes it, its failure opens it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Failed attempts since the last success.
    pub failures: u32,
    /// Since when every attempt has failed.
    pub failing_since: Option<Micros>,
    /// Until when it is open (then half-open until a success).
    pub open_until: Option<Micros>,
    /// A probe is in flight.
    pub probing: bool,
}

/// Whether an attempt may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go; `probe` when it is the half-open circuit's one probe.
    Go {
        /// Whether this attempt is the probe.
        probe: bool,
    },
    /// Wait until then (no attempt is spent).
    Wait(Micros),
}

impl Breaker {
    /// Take the decision for an attempt about to start at `now`.
    pub fn admit(&mut self, now: Micros) -> Admit {
        match self.open_until {
            None => Admit::Go { probe: false },
            Some(until) if now < until => Admit::Wait(until),
            Some(_) if self.probing => Admit::Wait(now.plus(PROBE_WAIT)),
            Some(_) => {
                self.probing = true;
                Admit::Go { probe: true }
            }
        }
    }

    /// When deliveries must wait without taking anything (the circuit is open), until when.
    pub fn closed_until(&self, now: Micros) -> Option<Micros> {
        self.open_until.filter(|&until| now < until)
    }

    /// A probe that was admitted did not go after all.
    pub fn cancel_probe(&mut self, probe: bool) {
        if probe {
            self.probing = false;
        }
    }

    /// An attempt succeeded: the circuit closes. Returns whether anything changed.
    pub fn success(&mut self) -> bool {
        let changed = self.failures > 0 || self.open_until.is_some();
        *self = Breaker::default();
        changed
    }

    /// An attempt failed at `now`. Returns the new end of the open period when this failure
    /// opened the circuit (the threshold reached, or the probe failed).
    pub fn failure(
        &mut self,
        now: Micros,
        probe: bool,
        threshold: u32,
        open_for: Duration,
    ) -> Option<Micros> {
        self.failures = self.failures.saturating_add(1);
        self.failing_since.get_or_insert(now);
        if probe {
            self.probing = false;
        }
        let reopen = probe || (self.open_until.is_none() && self.failures >= threshold);
        if reopen {
            let until = now.plus(open_for);
            self.open_until = Some(until);
            return Some(until);
        }
        None
    }

    /// The circuit as the API shows it.
    pub fn circuit(&self, now: Micros) -> Circuit {
        match self.open_until {
            None => Circuit::Closed,
            Some(until) if now < until => Circuit::Open,
            Some(_) => Circuit::HalfOpen,
        }
    }
}

/// This node's view of its endpoint's token bucket in the cluster (`endpoint_budgets`): the
/// bucket holds at most `rate` tokens (one second's worth) and refills at `rate` a second; this
/// node holds and refills at its part of that (`part`, as the last report said), reports what it
/// spent and adopts the view the report gives back (`delivery::budget`).
///
/// A taker that finds no token reserves a turn at this node's pace: the turns reserved are this
/// node's plan for its part of the rate, counted against its view but reported only when used
/// (or given back unused), so a node's plan never holds another node back.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: u32,
    /// This node's part of the rate, tokens a second: what its view refills, and holds at most.
    part: f64,
    /// Tokens in the view, less the turns reserved (negative: the reserved turns to come).
    tokens: f64,
    at: Micros,
    /// Tokens taken and turns used (less those given back) since the last report.
    unreported: i32,
    /// Whether a report came back since the bucket was set up (or failed: then this node goes by
    /// its own view). Until then the view is empty and refills nothing.
    heard: bool,
    /// Turns reserved and not used or given back yet.
    reserved: u32,
    /// The book those turns are in: a new one when they are all given back at once (this node's
    /// part changed, so they were paced wrong), or for a new bucket. A turn of another book is
    /// void: its taker takes again.
    book: u64,
}

/// Books of reserved turns, never the same number twice in a process (so no turn of a bucket
/// replaced for a new rate passes for one of its successor's).
static BOOKS: AtomicU64 = AtomicU64::new(0);

fn new_book() -> u64 {
    BOOKS.fetch_add(1, Ordering::Relaxed)
}

/// A part of the rate that changes by more than this factor (either way) re-paces the turns
/// reserved; smaller changes (the deliveries each node holds move all the time) leave them.
const REPACE_AT: f64 = 1.25;

/// When a taker that found no token may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later {
    /// A turn is reserved for it then, in the given book: it goes without taking another
    /// ([`TokenBucket::use_turn`]), unless the book was closed meanwhile.
    Reserved(Micros, u64),
    /// Nothing reserved: the bucket is a fresh view that has not heard from the cluster yet
    /// (the node's first report on it is asked for at once). Take again then, or when the
    /// report comes back.
    Unheard(Micros),
}

impl TokenBucket {
    /// This node's first view of the bucket: empty until the cluster's balance comes back
    /// (`adopt`) with this node's part of it. A view that started full let every node that came
    /// to the endpoint at the same moment send a second's worth: the limit once per node.
    pub fn new(rate: u32, now: Micros) -> TokenBucket {
        let rate = rate.max(1);
        TokenBucket {
            rate,
            part: f64::from(rate),
            tokens: 0.0,
            at: now,
            unreported: 0,
            heard: false,
            reserved: 0,
            book: new_book(),
        }
    }

    /// Its rate (the whole cluster's).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Whether the cluster's balance came back (or a report failed) since it was set up.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// Take a token at `now`: `Ok` to go now, or when to go ([`Later`]): usually a turn
    /// reserved for the caller then, when it goes without taking another. Those that wait for
    /// their turn so wake one at a time, each at its own moment, not all at the next token (where
    /// all but one would wait again). A turn not used is given back
    /// ([`TokenBucket::give_back_turn`]).
    pub fn take(&mut self, now: Micros) -> Result<(), Later> {
        self.refill(now);
        if !self.heard {
            return Err(Later::Unheard(now.plus(UNHEARD_WAIT_MAX)));
        }
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            self.unreported = self.unreported.saturating_add(1);
            return Ok(());
        }
        self.reserved += 1;
        let wait_us = (-self.tokens / self.part * 1e6).ceil() as i64;
        Err(Later::Reserved(Micros(now.0 + wait_us.max(1)), self.book))
    }

    /// The turn reserved in `book` has come: `Ok` to go on it, or what a fresh take says when
    /// the turn is void (all turns were given back since, or the bucket is a new one).
    pub fn use_turn(&mut self, book: u64, now: Micros) -> Result<(), Later> {
        if book != self.book {
            return self.take(now);
        }
        self.reserved = self.reserved.saturating_sub(1);
        self.unreported = self.unreported.saturating_add(1);
        Ok(())
    }

    /// Give back a turn reserved in `book` and not used (nothing when it is void: it was given
    /// back with its book): the next taker's turn comes sooner.
    pub fn give_back_turn(&mut self, book: u64, now: Micros) {
        if book == self.book {
            self.reserved = self.reserved.saturating_sub(1);
            self.restore(now);
        }
    }

    /// Give back a token taken (or a turn used) and not sent after all.
    pub fn give_back(&mut self, now: Micros) {
        self.restore(now);
        self.unreported = self.unreported.saturating_sub(1);
    }

    /// One token back into the view, up to this node's part of one second's worth.
    fn restore(&mut self, now: Micros) {
        self.refill(now);
        self.tokens = (self.tokens + 1.0).min(self.part);
    }

    /// Whether nothing was taken, reserved or given back for [`BUCKET_FORGET_AFTER`] before
    /// `now`, and nothing is left to report or to use: the view may be forgotten.
    pub fn settled(&self, now: Micros) -> bool {
        self.unreported == 0
            && self.reserved == 0
            && now.0 - self.at.0 >= BUCKET_FORGET_AFTER.as_micros() as i64
    }

    /// What was spent since the last report, to report now (counted afresh from here).
    pub fn to_report(&mut self) -> i32 {
        std::mem::take(&mut self.unreported)
    }

    /// A report of `spent` did not reach the cluster: it is reported again with the next one, up
    /// to one second's worth in all (what a node spent on its own view while the database was
    /// away does not hold every node back for a minute once it is back).
    /// Returns whether it had not heard before (the takers that found it so wait for this).
    pub fn unreported_again(&mut self, spent: i32) -> bool {
        let most = i32::try_from(self.rate).unwrap_or(i32::MAX);
        self.unreported = self.unreported.saturating_add(spent).min(most);
        // No balance will come back soon: this node goes by its own view (its part of the rate
        // as last heard; all of it if it never heard), turns included.
        !std::mem::replace(&mut self.heard, true)
    }

    /// This node's view as the last report gave it (`view`: its part of the cluster's balance;
    /// `part`: its part of the rate), as of `now`, less what it spent since that report was
    /// taken and the turns it has reserved. Returns whether the takers waiting should take
    /// again: it is the first it heard (those that found it empty hold no turn), or the part
    /// changed by more than `REPACE_AT` with turns reserved: they were paced at the old part
    /// (too fast when another node has come, too slow when it has gone), so they are all given
    /// back at once (one by one, each taker would give back its own turn and take the same
    /// one again) and their takers take anew.
    pub fn adopt(&mut self, view: f64, part: f64, now: Micros) -> bool {
        let part = part.max(1e-3);
        let old = std::mem::replace(&mut self.part, part);
        self.tokens = (view - f64::from(self.unreported) - f64::from(self.reserved)).min(self.part);
        self.at = self.at.max(now);
        let repace = self.reserved > 0 && (part > old * REPACE_AT || part * REPACE_AT < old);
        if repace {
            let turns = std::mem::take(&mut self.reserved);
            self.tokens = (self.tokens + f64::from(turns)).min(self.part);
            self.book = new_book();
        }
        let first = !std::mem::replace(&mut self.heard, true);
        first || repace
    }

    /// What `now` adds since the last look, up to this node's part of one second's worth; a
    /// view that has not heard from the cluster gains nothing.
    fn refill(&mut self, now: Micros) {
        if self.heard {
            let elapsed = (now.0 - self.at.0).max(0) as f64 / 1e6;
            self.tokens = (self.tokens + elapsed * self.part).min(self.part);
        }
        self.at = self.at.max(now);
    }
}

/// An endpoint's spell of deliveries the server could not send: its host could not be looked up
/// now (the resolver failed or did not answer), or the server had no socket, port, memory or
/// route to connect with. That is the server's trouble (or, for a lookup, maybe the host's DNS
/// servers'), and nothing was sent: for `patience` from the spell's first failure the deliveries
/// wait and try again (1 s, doubling up to 30 s) without it counting as an attempt, so such an
/// outage burns no attempt, opens no circuit and dead-letters nothing. After that the endpoint is
/// treated like any receiver that can't be reached: each such failure is a failed attempt.
#[derive(Debug, Default)]
pub struct UnsentSpell {
    /// When the spell began.
    since: Option<Micros>,
    /// Deliveries wait until then before the next try.
    until: Option<Micros>,
    /// Failures in the spell.
    failures: u32,
}

/// What a delivery the server could not send does, from [`UnsentSpell::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsentVerdict {
    /// Not an attempt: the deliveries wait.
    Wait {
        /// Until then.
        until: Micros,
        /// The spell's first failure.
        first: bool,
    },
    /// The spell is older than the patience: a failed attempt.
    Attempt {
        /// The first such in the spell.
        first: bool,
    },
}

impl UnsentSpell {
    /// A delivery could not be sent at `now`. Failures while the deliveries already wait (tries
    /// that started together) are one failure: they wait for the same time.
    pub fn failed(&mut self, now: Micros, patience: Duration) -> UnsentVerdict {
        if let Some(until) = self.wait_until(now) {
            return UnsentVerdict::Wait {
                until,
                first: false,
            };
        }
        let since = *self.since.get_or_insert(now);
        let n = self.failures;
        self.failures = n.saturating_add(1);
        if now.0 - since.0 >= patience.as_micros() as i64 {
            let first = self.until.is_some() || n == 0;
            self.until = None;
            return UnsentVerdict::Attempt { first };
        }
        let wait = UNSENT_WAIT_MIN
            .saturating_mul(1 << n.min(5))
            .min(UNSENT_WAIT_MAX);
        let until = now.plus(wait);
        self.until = Some(until);
        UnsentVerdict::Wait {
            until,
            first: n == 0,
        }
    }

    /// Until when deliveries wait before the next try, if they wait at `now`.
    pub fn wait_until(&self, now: Micros) -> Option<Micros> {
        self.until.filter(|until| *until > now)
    }

    /// An exchange got a connection (a new one or a kept one): the spell is over.
    pub fn over(&mut self) {
        *self = UnsentSpell::default();
    }
}

/// The breaker and the limiter of one endpoint, under one lock.
#[derive(Debug, Default)]
pub struct Gates {
    /// The circuit breaker.
    pub breaker: Breaker,
    /// The limiter, while the endpoint has a limit.
    pub bucket: Option<TokenBucket>,
    /// Its spell of deliveries the server could not send, if one is on.
    pub unsent: UnsentSpell,
    /// The endpoint's `updated_at` these gates were set up for.
    pub config_at: Micros,
    /// When a success was last written to the endpoint's health.
    pub success_written_at: Option<Micros>,
    /// The endpoint cache's change epoch of a change to its organization's endpoints since the
    /// gates were synced (a resume on any node starts the circuit afresh): until a job syncs them
    /// with the endpoint as loaded after that change, an open breaker here no longer keeps the
    /// claimer from the endpoint's due rows.
    pub recheck: Option<u64>,
}

impl Gates {
    /// The gates were synced with the endpoint as loaded at change epoch `loaded_at`: a change
    /// recorded by then is taken into account; a later one still waits for its recheck.
    pub fn synced(&mut self, loaded_at: u64) {
        if self.recheck.is_some_and(|change| loaded_at >= change) {
            self.recheck = None;
        }
    }

    /// Whether the claimer leaves the endpoint's due rows alone at `now`: its circuit is open
    /// and no change since the gates were synced may have closed it.
    pub fn keeps_claims_away(&self, now: Micros) -> bool {
        self.recheck.is_none() && self.breaker.closed_until(now).is_some()
    }
}

/// What this node keeps per endpoint.
#[derive(Debug)]
pub struct EndpointRuntime {
    /// The endpoint.
    pub id: Uuid,
    /// Its organization.
    pub org: OrgId,
    /// Its share of delivery concurrency.
    pub slots: Arc<Semaphore>,
    /// Deliveries to it held in memory.
    pub in_memory: AtomicUsize,
    /// Of those, the ones waiting for a later time (a retry's schedule, an open circuit): held,
    /// but asking nothing of its rate limit now.
    pub not_yet: AtomicUsize,
    /// Its breaker and limiter.
    pub gates: Mutex<Gates>,
    /// Woken when its configuration may have changed (on any node), or its half-open circuit's
    /// probe is over: deliveries waiting on its gates look again, so a resume (a fresh circuit),
    /// a higher rate limit or a probe's success lets them go now. Only through
    /// [`EndpointRuntime::change`].
    pub changed: Notify,
    /// How many times `changed` was woken: a delivery that looked at the endpoint before the
    /// last of them (during its look) looks again before it waits.
    changes: AtomicU64,
}

impl EndpointRuntime {
    /// A fresh runtime with `slots` concurrent attempts.
    pub fn new(id: Uuid, org: OrgId, slots: usize) -> EndpointRuntime {
        EndpointRuntime {
            id,
            org,
            slots: Arc::new(Semaphore::new(slots)),
            in_memory: AtomicUsize::new(0),
            not_yet: AtomicUsize::new(0),
            gates: Mutex::new(Gates::default()),
            changed: Notify::new(),
            changes: AtomicU64::new(0),
        }
    }

    /// Wake the deliveries waiting on the endpoint's gates (see `changed`), and count it.
    pub fn change(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// How many times [`EndpointRuntime::change`] was called.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// The gates, locked.
    pub fn gates(&self) -> std::sync::MutexGuard<'_, Gates> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deliveries held in memory.
    pub fn held(&self) -> usize {
        self.in_memory.load(Ordering::Relaxed)
    }

    /// Deliveries held that would go now if its gates let them: what this node asks of the
    /// cluster's rate limit. Retries not yet due and deliveries behind an open circuit are held
    /// too, but a node holding many of them would otherwise take a part of the rate it can't use.
    pub fn wants(&self) -> usize {
        self.held()
            .saturating_sub(self.not_yet.load(Ordering::Relaxed))
    }

    /// Count a delivery as waiting for a later time (not in [`Self::wants`]) while the guard lives.
    pub fn not_yet(&self) -> NotYet<'_> {
        self.not_yet.fetch_add(1, Ordering::Relaxed);
        NotYet(&self.not_yet)
    }
}

/// A delivery counted as waiting for a later time; see [`EndpointRuntime::not_yet`].
pub struct NotYet<'a>(&'a AtomicUsize);

impl Drop for NotYet<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    /// When the turn reserved is, if one was.
    fn turn(taken: Result<(), Later>) -> Option<Micros> {
        match taken {
            Err(Later::Reserved(at, _)) => Some(at),
            _ => None,
        }
    }

    #[test]
    fn unsent_deliveries_wait_longer_each_time_until_the_patience_is_spent() {
        let patience = Duration::from_secs(100);
        let mut l = UnsentSpell::default();
        assert_eq!(l.wait_until(Micros(0)), None);
        let mut at = 10 * S;
        let mut waits = Vec::new();
        loop {
            match l.failed(Micros(at), patience) {
                UnsentVerdict::Wait { until, first } => {
                    assert_eq!(first, waits.is_empty());
                    assert_eq!(l.wait_until(Micros(at)), Some(until));
                    // Another lookup that failed meanwhile waits for the same time.
                    assert_eq!(
                        l.failed(Micros(at + 1), patience),
                        UnsentVerdict::Wait {
                            until,
                            first: false
                        }
                    );
                    assert_eq!(l.wait_until(until), None, "over when it is due");
                    waits.push((until.0 - at) / S);
                    at = until.0;
                }
                UnsentVerdict::Attempt { first } => {
                    assert!(first);
                    break;
                }
            }
        }
        // Waits of 1, 2, 4, 8, 16 s, then 30 s each; the failure 121 s into the spell is past
        // the 100 s patience: an attempt, and so is every one after it, without waits.
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(at - 10 * S, 121 * S);
        assert_eq!(
            l.failed(Micros(at + S), patience),
            UnsentVerdict::Attempt { first: false }
        );
        assert_eq!(l.wait_until(Micros(at)), None);
        // A connection made ends the spell: the next failure waits 1 s again.
        l.over();
        assert_eq!(
            l.failed(Micros(at + 2 * S), patience),
            UnsentVerdict::Wait {
                until: Micros(at + 3 * S),
                first: true
            }
        );
        // No patience: the first failure is an attempt.
        let mut none = UnsentSpell::default();
        assert_eq!(
            none.failed(Micros(S), Duration::ZERO),
            UnsentVerdict::Attempt { first: true }
        );
    }

    #[test]
    fn the_breaker_opens_after_the_threshold_and_probes_once() {
        let mut b = Breaker::default();
        let open = Duration::from_secs(30);
        for i in 0..9 {
            assert_eq!(b.failure(Micros(i), false, 10, open), None);
            assert_eq!(b.admit(Micros(i)), Admit::Go { probe: false });
        }
        assert_eq!(
            b.failure(Micros(10 * S), false, 10, open),
            Some(Micros(40 * S))
        );
        assert_eq!(b.circuit(Micros(10 * S)), Circuit::Open);
        assert_eq!(b.admit(Micros(20 * S)), Admit::Wait(Micros(40 * S)));
        assert_eq!(b.closed_until(Micros(20 * S)), Some(Micros(40 * S)));
        // Half-open: one probe, the others wait.
        assert_eq!(b.circuit(Micros(40 * S)), Circuit::HalfOpen);
        assert_eq!(b.admit(Micros(40 * S)), Admit::Go { probe: true });
        assert!(matches!(b.admit(Micros(40 * S)), Admit::Wait(_)));
        // A failed probe opens it again for the whole period.
        assert_eq!(
            b.failure(Micros(41 * S), true, 10, open),
            Some(Micros(71 * S))
        );
        assert_eq!(b.admit(Micros(50 * S)), Admit::Wait(Micros(71 * S)));
        // A successful probe closes it.
        assert_eq!(b.admit(Micros(71 * S)), Admit::Go { probe: true });
        assert!(b.success());
        assert_eq!(b.circuit(Micros(71 * S)), Circuit::Closed);
        assert_eq!(b.failures, 0);
        assert!(!b.success(), "nothing changes on a healthy endpoint");
    }

    #[test]
    fn late_failures_of_attempts_started_before_it_opened_keep_the_period() {
        let mut b = Breaker::default();
        let open = Duration::from_secs(30);
        for _ in 0..10 {
            b.failure(Micros(0), false, 10, open);
        }
        assert_eq!(b.failure(Micros(5 * S), false, 10, open), None);
        assert_eq!(b.open_until, Some(Micros(30 * S)));
        assert_eq!(b.failing_since, Some(Micros(0)));
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_one_go() {
        let mut b = Breaker {
            open_until: Some(Micros(0)),
            ..Breaker::default()
        };
        assert_eq!(b.admit(Micros(1)), Admit::Go { probe: true });
        b.cancel_probe(true);
        assert_eq!(b.admit(Micros(2)), Admit::Go { probe: true });
    }

    #[test]
    fn the_bucket_spends_its_second_then_refills_at_its_rate() {
        let mut t = heard(5);
        for _ in 0..5 {
            assert_eq!(t.take(Micros(0)), Ok(()));
        }
        let reserved = t.take(Micros(0));
        assert_eq!(turn(reserved), Some(Micros(200_000)));
        // That token is reserved: the next one comes a fifth of a second later, and its taker
        // goes on it then without taking another.
        assert_eq!(turn(t.take(Micros(200_000))), Some(Micros(400_000)));
        let Err(Later::Reserved(at, book)) = reserved else {
            unreachable!()
        };
        assert_eq!(t.use_turn(book, at), Ok(()));
        assert_eq!(turn(t.take(at)), Some(Micros(600_000)));
        // A long idle spell refills it only to one second's worth.
        let later = Micros(100 * S);
        for _ in 0..5 {
            assert_eq!(t.take(later), Ok(()));
        }
        assert!(t.take(later).is_err());
    }

    #[test]
    fn waiting_takers_get_one_turn_each_at_the_rate() {
        let mut t = heard(10);
        for _ in 0..10 {
            assert_eq!(t.take(Micros(0)), Ok(()));
        }
        // Five wait: each is told its own turn, a tenth of a second apart.
        let taken: Vec<_> = (0..5).map(|_| t.take(Micros(0))).collect();
        let turns: Vec<_> = taken.iter().map(|&r| turn(r)).collect();
        let want: Vec<_> = (1..=5).map(|i| Some(Micros(i * 100_000))).collect();
        assert_eq!(turns, want);
        // The third gives its turn back: the next taker gets the fifth's turn, not a sixth.
        let Err(Later::Reserved(_, book)) = taken[2] else {
            unreachable!()
        };
        t.give_back_turn(book, Micros(50_000));
        assert_eq!(turn(t.take(Micros(50_000))), Some(Micros(500_000)));
        // Giving back never fills the bucket past one second's worth.
        let mut full = heard(3);
        full.give_back(Micros(0));
        for _ in 0..3 {
            assert_eq!(full.take(Micros(0)), Ok(()));
        }
        assert!(full.take(Micros(0)).is_err());
    }

    #[test]
    fn the_bucket_reports_its_spend_and_adopts_the_clusters_balance() {
        let mut t = heard(10);
        for _ in 0..4 {
            assert_eq!(t.take(Micros(0)), Ok(()));
        }
        t.give_back(Micros(0));
        assert_eq!(t.to_report(), 3);
        assert_eq!(t.to_report(), 0, "counted afresh");
        // Another node spent 9 meanwhile: the balance comes back at -2; one more was taken here
        // since the report left.
        assert!(t.take(Micros(0)).is_ok());
        t.adopt(-2.0, 10.0, Micros(0));
        assert_eq!(
            turn(t.take(Micros(0))),
            Some(Micros(400_000)),
            "four tenths of a second in debt"
        );
        assert_eq!(
            t.to_report(),
            1,
            "a turn reserved is reported when it is used"
        );
        // A report that failed is sent again with the next one, up to one second's worth.
        t.unreported_again(2);
        assert_eq!(t.to_report(), 2);
        for _ in 0..30 {
            t.unreported_again(7);
        }
        assert_eq!(t.to_report(), 10);
        // A balance above one second's worth (spends given back) is not kept.
        t.adopt(50.0, 10.0, Micros(S));
        for _ in 0..10 {
            assert_eq!(t.take(Micros(S)), Ok(()));
        }
        assert!(t.take(Micros(S)).is_err());
    }

    /// A full bucket that has heard from the cluster.
    fn heard(rate: u32) -> TokenBucket {
        let mut t = TokenBucket::new(rate, Micros(0));
        let all = f64::from(rate);
        assert!(t.adopt(all, all, Micros(0)), "the first it heard");
        assert!(!t.adopt(all, all, Micros(0)));
        t
    }

    #[test]
    fn a_fresh_view_gives_nothing_until_it_has_heard_its_part() {
        let mut t = TokenBucket::new(4, Micros(0));
        // Empty, and refilling nothing while the cluster's balance is not known: nothing is
        // taken or reserved; look again after the report.
        let again = Later::Unheard(Micros(S).plus(UNHEARD_WAIT_MAX));
        assert_eq!(t.take(Micros(S)), Err(again));
        assert_eq!(t.take(Micros(S)), Err(again));
        assert_eq!(t.to_report(), 0, "nothing spent");
        // The report comes back: another node wants as many, so this one's part is 2 a second
        // and its view 2 tokens.
        assert!(t.adopt(2.0, 2.0, Micros(S)), "the first it heard");
        assert!(!t.adopt(2.0, 2.0, Micros(S)), "nothing new");
        for _ in 0..2 {
            assert_eq!(t.take(Micros(S)), Ok(()));
        }
        // Then its part of the rate: a turn every half second.
        let first = t.take(Micros(S));
        assert_eq!(turn(first), Some(Micros(S + S / 2)));
        assert_eq!(turn(t.take(Micros(S))), Some(Micros(2 * S)));
        assert_eq!(t.to_report(), 2, "turns are reported when used");
        // The next report: the cluster's balance is spent. A new taker's turn comes after the
        // two reserved, and a part that moves a little leaves them as they are.
        assert!(!t.adopt(0.0, 2.0, Micros(S)));
        assert_eq!(turn(t.take(Micros(S))), Some(Micros(S + 3 * S / 2)));
        assert!(!t.adopt(0.0, 2.2, Micros(S)));
        // The other node has gone: all of the rate. The three turns paced at half of it are
        // given back at once, and their takers take anew (one by one, each would give back its
        // own turn and take the same one again).
        assert!(t.adopt(0.0, 4.0, Micros(S)), "re-paced");
        let Err(Later::Reserved(_, book)) = first else {
            unreachable!()
        };
        assert_eq!(turn(t.use_turn(book, Micros(S))), Some(Micros(S + S / 4)));
        assert_eq!(turn(t.use_turn(book, Micros(S))), Some(Micros(S + S / 2)));
        t.give_back_turn(book, Micros(S));
        assert_eq!(
            turn(t.take(Micros(S))),
            Some(Micros(S + 3 * S / 4)),
            "a void turn gives nothing back"
        );
        assert_eq!(t.to_report(), 0);

        // A debt is shared as the rate is: 3 of it, at a part of 2 a second.
        let mut d = heard(4);
        assert!(!d.adopt(-3.0, 2.0, Micros(0)), "no turns to re-pace");
        let debt = d.take(Micros(0));
        assert_eq!(turn(debt), Some(Micros(2 * S)));
        let Err(Later::Reserved(at, book)) = debt else {
            unreachable!()
        };
        assert_eq!(d.use_turn(book, at), Ok(()));
        assert_eq!(d.to_report(), 1);
        // A long idle spell refills it only to its part of one second's worth.
        let later = Micros(100 * S);
        d.adopt(0.0, 2.0, later);
        for _ in 0..2 {
            assert_eq!(d.take(Micros(101 * S)), Ok(()));
        }
        assert!(d.take(Micros(101 * S)).is_err());

        // A report that fails also ends the wait: the node goes by its own view, all of the
        // rate when it never heard its part.
        let mut lone = TokenBucket::new(2, Micros(0));
        assert!(matches!(lone.take(Micros(0)), Err(Later::Unheard(_))));
        let spent = lone.to_report();
        assert!(lone.unreported_again(spent), "the takers waiting are woken");
        assert!(!lone.unreported_again(0), "once");
        assert_eq!(turn(lone.take(Micros(0))), Some(Micros(S / 2)));
    }

    #[test]
    fn a_view_is_settled_a_minute_after_its_last_take_with_nothing_to_report() {
        let forget = BUCKET_FORGET_AFTER.as_micros() as i64;
        let mut t = heard(10);
        assert!(t.take(Micros(S)).is_ok());
        assert!(
            !t.settled(Micros(S + forget)),
            "the take is not reported yet"
        );
        assert_eq!(t.to_report(), 1);
        assert!(!t.settled(Micros(S + forget - 1)));
        assert!(t.settled(Micros(S + forget)));
        // A balance adopted (a report: spent, or deliveries held) is a view as of then.
        t.adopt(10.0, 10.0, Micros(S + forget));
        assert!(!t.settled(Micros(S + forget)));
        assert!(t.settled(Micros(S + 2 * forget)));
        // A turn given back is left to report.
        t.give_back(Micros(S + 2 * forget));
        assert!(!t.settled(Micros(S + 3 * forget)), "left to report");
        assert_eq!(t.to_report(), -1);
        assert!(t.settled(Micros(S + 3 * forget)));
    }

    #[test]
    fn an_open_circuit_keeps_claims_away_until_a_change_then_until_a_load_after_it() {
        let mut g = Gates {
            breaker: Breaker {
                failures: 10,
                open_until: Some(Micros(30 * S)),
                ..Breaker::default()
            },
            ..Gates::default()
        };
        assert!(g.keeps_claims_away(Micros(S)));
        // A resume somewhere: recorded at change epoch 5.
        g.recheck = Some(5);
        assert!(!g.keeps_claims_away(Micros(S)));
        // A load that started before the change shows the endpoint as it was.
        g.synced(4);
        assert!(!g.keeps_claims_away(Micros(S)));
        g.synced(5);
        assert!(g.keeps_claims_away(Micros(S)), "synced, still open");
        assert!(!g.keeps_claims_away(Micros(30 * S)), "closed by then");
    }
}
