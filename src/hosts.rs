//! Webhook hosts' addresses, one table per node: for the delivery client's new connections one
//! lookup serves every connection to a host for `--delivery-dns-fresh-s`, and while the resolver
//! fails the last addresses found serve for `--delivery-dns-stale-s` more (as RFC 8767's "serve
//! stale"). A URL being configured (the store's check) gets a lookup of its own, whose answer
//! then serves the first deliveries. Lookups of one host at the same moment are one.
//!
//! Without it every new connection looked its host up on a blocking thread of its own: a receiver
//! that closes its connections cost a DNS query per delivery (a resolver has limits of its own: a
//! VPC's answers 1,024 packets a second per interface), a host whose DNS servers do not answer
//! held a blocking thread per connection for as long as the system's resolver tries (the same
//! threads verify API keys), and a resolver outage stopped deliveries to receivers that were fine.
//!
//! At most [`LOOKUPS_AT_ONCE`] lookups run at once, each on a blocking thread; one more is not
//! run but answered at once as unanswered (the host's last addresses serve, as while the
//! resolver fails). Without the bound, endpoints on many hosts whose DNS servers do not answer
//! held a blocking thread per host (up to tokio's 512) for as long as the resolver tried: the
//! threads that hash and check API keys. Of those, at most [`LOOKUPS_UNANSWERED_MAX`] are for
//! hosts whose last lookup got no answer: endpoints whose DNS died, asked again as their
//! deliveries come due, held every slot, and a host that answers but had no fresh addresses got
//! none (its deliveries waited, unsent, for as long as such hosts were asked). And at most
//! [`LOOKUPS_PER_ORG_MAX`] are for one organization's URL checks: names never asked before are
//! not known to fail, and a few tenants creating endpoint after endpoint on new names under a
//! domain whose DNS servers do not answer held all of them (each lookup for as long as the
//! resolver tries, after its check had given up), so another organization's new endpoint on a
//! host that answers was a 503 (its lookup not run). All organizations' URL checks together run
//! at most [`LOOKUPS_CONFIGURE_MAX`]: sixteen tenants doing so held all of them, and a delivery
//! to a host with no addresses kept (a new endpoint, or any after a restart) waited unsent.
//!
//! The table keeps at most [`HOSTS_KEPT_MAX`] hosts: past three quarters of it, those only URL
//! checks asked for go first, then those asked for longest ago. Before, every host looked up was
//! kept for fresh + stale (an hour), and a tenant changing an endpoint's URL to ever new names
//! (a wildcard DNS zone answers them all) grew the table without end.
//!
//! The SSRF policy ([`crate::url_policy`]) judges the addresses at every use: one kept here is
//! judged again each time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::{
    HOSTS_KEPT_MAX, LOOKUPS_AT_ONCE, LOOKUPS_CONFIGURE_MAX, LOOKUPS_PER_ORG_MAX,
    LOOKUPS_UNANSWERED_MAX,
};
use crate::ids::OrgId;
use crate::metrics::Metrics;
use crate::url_policy::{
    allowed, unresolved, LookupFailed, Unresolved, WebhookUrl, RESOLVE_TIMEOUT,
};

/// What a lookup found.
type Found = Result<Arc<[IpAddr]>, LookupFailed>;

/// The blocking lookup (getaddrinfo; the tests' own).
type LookupFn = dyn Fn(&str) -> Result<Vec<IpAddr>, LookupFailed> + Send + Sync;

/// Hosts kept before the first sweep of those whose addresses are too old to use.
const SWEEP_FIRST: usize = 1024;

/// How long a lookup that got no answer is the answer for a host, before it is asked again: during
/// an outage a host costs one lookup a second, not one per connection.
const FAILURE_KEPT: Duration = Duration::from_secs(1);

/// What is known of one host.
#[derive(Default)]
struct Entry {
    /// The last addresses found, and when.
    known: Option<(Arc<[IpAddr]>, Instant)>,
    /// A lookup under way.
    pending: Option<Arc<Pending>>,
    /// When the last lookup got no answer, if it did not (the resolver failed).
    failed: Option<Instant>,
    /// The last lookup that ran got no answer: the host's next ones count against
    /// [`LOOKUPS_UNANSWERED_MAX`].
    unanswered: bool,
    /// A connection asked for the host (not only a URL check).
    connected: bool,
    /// When the host was last asked for.
    used: Option<Instant>,
}

impl Entry {
    /// Whether the entry still serves, `keep` being how long addresses may: a lookup under way,
    /// addresses young enough, or a failure lately (the host stays marked unanswered).
    fn serves(&self, now: Instant, keep: Duration) -> bool {
        self.pending.is_some()
            || self
                .known
                .as_ref()
                .is_some_and(|(_, at)| now.duration_since(*at) < keep)
            || self.failed.is_some_and(|at| now.duration_since(at) < keep)
    }
}

/// A lookup under way: its answer, once there, and the callers waiting for it.
struct Pending {
    started: Instant,
    found: Mutex<Option<Found>>,
    done: Notify,
}

impl Pending {
    async fn wait(&self) -> Found {
        loop {
            let mut notified = std::pin::pin!(self.done.notified());
            notified.as_mut().enable();
            if let Some(found) = self.found.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return found;
            }
            notified.await;
        }
    }
}

struct Inner {
    fresh: Duration,
    stale: Duration,
    entries: Mutex<Table>,
    lookup: Box<LookupFn>,
    /// Lookups running now (at most [`LOOKUPS_AT_ONCE`]).
    running: AtomicUsize,
    /// Of those, lookups of hosts whose last lookup got no answer (at most
    /// [`LOOKUPS_UNANSWERED_MAX`]).
    running_unanswered: AtomicUsize,
    /// Of those, lookups for URL checks (at most [`LOOKUPS_CONFIGURE_MAX`]).
    running_configure: AtomicUsize,
    /// Each organization's slots for the lookups of its URL checks ([`LOOKUPS_PER_ORG_MAX`]).
    by_org: Mutex<Slots>,
    metrics: Arc<Metrics>,
}

/// Organizations' lookup slots: those with a lookup running or a check waiting, and others
/// until the map is next swept.
struct Slots {
    orgs: HashMap<OrgId, Arc<Semaphore>>,
    /// Sweep when the map reaches this many organizations.
    sweep_at: usize,
}

struct Table {
    hosts: HashMap<String, Entry>,
    /// Sweep when the table reaches this many hosts.
    sweep_at: usize,
    /// The most hosts kept ([`HOSTS_KEPT_MAX`]; tests set fewer).
    kept_max: usize,
}

impl Table {
    /// Make room for a new host: drop those whose addresses are too old to use (`keep`), and
    /// when more than three quarters of `kept_max` are left, those only URL checks asked for,
    /// then those not asked for within a span halved until three quarters are left. A lookup
    /// under way stays.
    fn sweep(&mut self, now: Instant, keep: Duration) {
        self.hosts.retain(|_, e| e.serves(now, keep));
        let room = self.kept_max / 4 * 3;
        if self.hosts.len() > room {
            self.hosts.retain(|_, e| e.pending.is_some() || e.connected);
        }
        let age = |at: Instant| now.duration_since(at);
        let mut within = (self.hosts.values().filter_map(|e| e.used))
            .map(age)
            .max()
            .unwrap_or_default();
        while self.hosts.len() > room && !within.is_zero() {
            within /= 2;
            self.hosts
                .retain(|_, e| e.pending.is_some() || e.used.is_some_and(|at| age(at) < within));
        }
        self.sweep_at = (self.hosts.len() * 2).max(SWEEP_FIRST).min(self.kept_max);
    }
}

/// Webhook hosts' addresses (see the module's documentation). Cheap to clone.
#[derive(Clone)]
pub struct Hosts(Arc<Inner>);

/// What addresses are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A new connection to the host.
    Connect,
    /// A URL being configured by this organization: its host must resolve now.
    Configure(OrgId),
}

/// How [`Hosts::find`] came by its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A lookup of the last `fresh` (this call's, one it shared, or an earlier one's).
    Fresh,
    /// The last addresses found, older than `fresh`: the resolver failed or did not answer.
    Stale,
}

impl Hosts {
    /// Hosts looked up with the system's resolver.
    pub fn new(fresh: Duration, stale: Duration, metrics: Arc<Metrics>) -> Hosts {
        Hosts::with_lookup(
            fresh,
            stale,
            metrics,
            Box::new(crate::url_policy::lookup_blocking),
        )
    }

    fn with_lookup(
        fresh: Duration,
        stale: Duration,
        metrics: Arc<Metrics>,
        lookup: Box<LookupFn>,
    ) -> Hosts {
        Hosts(Arc::new(Inner {
            fresh,
            stale,
            entries: Mutex::new(Table {
                hosts: HashMap::new(),
                sweep_at: SWEEP_FIRST.min(HOSTS_KEPT_MAX),
                kept_max: HOSTS_KEPT_MAX,
            }),
            lookup,
            running: AtomicUsize::new(0),
            running_unanswered: AtomicUsize::new(0),
            running_configure: AtomicUsize::new(0),
            by_org: Mutex::new(Slots {
                orgs: HashMap::new(),
                sweep_at: SWEEP_FIRST,
            }),
            metrics,
        }))
    }

    /// The addresses of `url` the policy allows: for a new connection (`Use::Connect`), a
    /// host's kept addresses while fresh, else a lookup (waiting at most [`RESOLVE_TIMEOUT`]),
    /// else, while the resolver fails, its kept addresses within `stale`; for a URL being
    /// configured (`Use::Configure`), a lookup (one under way is shared) and nothing kept,
    /// within [`RESOLVE_TIMEOUT`] in all (waiting for one of the organization's slots included).
    pub async fn resolve(
        &self,
        url: &WebhookUrl,
        allow_private: bool,
        use_: Use,
    ) -> Result<Vec<SocketAddr>, Unresolved> {
        if let Ok(ip) = url.host.parse::<IpAddr>() {
            return allowed(url, &[ip], allow_private);
        }
        let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
        let found = match use_ {
            Use::Connect => self.find(&url.host, true, None, deadline).await,
            Use::Configure(org) => {
                let slots = self.org_slots(org);
                match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
                    Ok(Ok(slot)) => self.find(&url.host, false, Some(slot), deadline).await,
                    _ => Err(LookupFailed::ResolverDown),
                }
            }
        };
        match found {
            Ok((ips, _)) => allowed(url, &ips, allow_private),
            Err(failed) => Err(unresolved(url, failed, allow_private)),
        }
    }

    /// The slots of `org`'s lookups for its URL checks.
    fn org_slots(&self, org: OrgId) -> Arc<Semaphore> {
        let mut slots = self.0.by_org.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.orgs.contains_key(&org) && slots.orgs.len() >= slots.sweep_at {
            // Those no lookup or check holds.
            slots.orgs.retain(|_, s| Arc::strong_count(s) > 1);
            slots.sweep_at = (slots.orgs.len() * 2).max(SWEEP_FIRST);
        }
        let org_slots = slots
            .orgs
            .entry(org)
            .or_insert_with(|| Arc::new(Semaphore::new(LOOKUPS_PER_ORG_MAX)));
        Arc::clone(org_slots)
    }

    /// The addresses of `host` (a name): `kept` ones may serve (see [`Hosts::resolve`]), a
    /// lookup's answer is waited for until `deadline`. A lookup started here holds `slot`, if
    /// given, until it ends.
    async fn find(
        &self,
        host: &str,
        kept: bool,
        slot: Option<OwnedSemaphorePermit>,
        deadline: tokio::time::Instant,
    ) -> Result<(Arc<[IpAddr]>, Source), LookupFailed> {
        let now = Instant::now();
        let (pending, new, known) = {
            let mut table = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
            let inner = &self.0;
            if !table.hosts.contains_key(host) && table.hosts.len() >= table.sweep_at {
                table.sweep(now, inner.fresh.saturating_add(inner.stale));
            }
            let entry = table.hosts.entry(host.to_string()).or_default();
            entry.used = Some(now);
            entry.connected |= kept;
            if let Some((ips, at)) = entry.known.as_ref().filter(|_| kept) {
                if now.duration_since(*at) < inner.fresh {
                    return Ok((Arc::clone(ips), Source::Fresh));
                }
            }
            // Answered at once from what is kept, for a connection: within a second of a
            // failed lookup, or while a lookup has gone unanswered for as long as a caller waits
            // (the resolver's own tries take longer: a connection is not held for it).
            let failed_lately = entry
                .failed
                .is_some_and(|at| now.duration_since(at) < FAILURE_KEPT);
            let hung = |p: &Pending| now.duration_since(p.started) >= RESOLVE_TIMEOUT;
            if kept && entry.pending.as_deref().map_or(failed_lately, hung) {
                let known = entry.known.clone();
                drop(table);
                return self.stale(known);
            }
            let (pending, new) = match &entry.pending {
                Some(pending) => (Arc::clone(pending), false),
                None => {
                    let pending = Arc::new(Pending {
                        started: now,
                        found: Mutex::new(None),
                        done: Notify::new(),
                    });
                    entry.pending = Some(Arc::clone(&pending));
                    (pending, true)
                }
            };
            let new = new.then_some(entry.unanswered);
            (pending, new, entry.known.clone().filter(|_| kept))
        };
        if let Some(unanswered) = new {
            self.start(host.to_string(), Arc::clone(&pending), unanswered, slot);
        }
        // No answer in time: the lookup goes on, and later calls share it.
        let found = tokio::time::timeout_at(deadline, pending.wait())
            .await
            .unwrap_or(Err(LookupFailed::ResolverDown));
        match found {
            Ok(ips) => Ok((ips, Source::Fresh)),
            Err(LookupFailed::ResolverDown) => self.stale(known),
            Err(LookupFailed::NoAddress) => Err(LookupFailed::NoAddress),
        }
    }

    /// The resolver failed: the `known` addresses if they are recent enough to serve.
    fn stale(
        &self,
        known: Option<(Arc<[IpAddr]>, Instant)>,
    ) -> Result<(Arc<[IpAddr]>, Source), LookupFailed> {
        match known {
            Some((ips, at))
                if Instant::now().duration_since(at)
                    < self.0.fresh.saturating_add(self.0.stale) =>
            {
                self.0
                    .metrics
                    .host_stale
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok((ips, Source::Stale))
            }
            _ => Err(LookupFailed::ResolverDown),
        }
    }

    /// Look `host` up on a blocking thread (it goes on when every caller waiting for it has
    /// gone) and give what it found to `pending`; with [`LOOKUPS_AT_ONCE`] lookups running
    /// already, for a host whose last lookup got no answer ([`LOOKUPS_UNANSWERED_MAX`] of such
    /// hosts'), or for a URL check (`org_slot`: one of an organization's;
    /// [`LOOKUPS_CONFIGURE_MAX`] of all checks'), it is not run but answered at once as
    /// unanswered. It holds `org_slot` until it ends.
    fn start(
        &self,
        host: String,
        pending: Arc<Pending>,
        unanswered: bool,
        org_slot: Option<OwnedSemaphorePermit>,
    ) {
        let inner = &self.0;
        inner.metrics.host_lookups.fetch_add(1, Ordering::Relaxed);
        let configure = org_slot.is_some();
        if !self.take_slots(unanswered, configure) {
            self.found(&host, &pending, Err(LookupFailed::ResolverDown), false);
            return;
        }
        let hosts = self.clone();
        tokio::task::spawn_blocking(move || {
            let found: Found = (hosts.0.lookup)(&host).map(Into::into);
            for (running, _) in hosts.bounds(unanswered, configure) {
                running.fetch_sub(1, Ordering::AcqRel);
            }
            hosts.found(&host, &pending, found, true);
            drop(org_slot);
        });
    }

    /// The bounds a lookup counts against, with their limits: every lookup the whole
    /// [`LOOKUPS_AT_ONCE`], one of a host that did not answer or for a URL check its part too.
    fn bounds(
        &self,
        unanswered: bool,
        configure: bool,
    ) -> impl Iterator<Item = (&AtomicUsize, usize)> {
        let inner = &self.0;
        [
            (true, &inner.running, LOOKUPS_AT_ONCE),
            (
                unanswered,
                &inner.running_unanswered,
                LOOKUPS_UNANSWERED_MAX,
            ),
            (configure, &inner.running_configure, LOOKUPS_CONFIGURE_MAX),
        ]
        .into_iter()
        .filter_map(|(counts, running, max)| counts.then_some((running, max)))
    }

    /// A slot in each of the lookup's [`Hosts::bounds`], or none if one is full.
    fn take_slots(&self, unanswered: bool, configure: bool) -> bool {
        for (taken, (running, max)) in self.bounds(unanswered, configure).enumerate() {
            if running.fetch_add(1, Ordering::AcqRel) >= max {
                running.fetch_sub(1, Ordering::AcqRel);
                for (running, _) in self.bounds(unanswered, configure).take(taken) {
                    running.fetch_sub(1, Ordering::AcqRel);
                }
                return false;
            }
        }
        true
    }

    /// Keep what a lookup of `host` found and give it to its callers (`ran`: false for one not
    /// run, which is not warned of).
    fn found(&self, host: &str, pending: &Pending, found: Found, ran: bool) {
        self.record(host, &found, ran);
        *pending.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
        pending.done.notify_waiters();
    }

    /// Keep what a lookup of `host` found (`ran`: false for one not run: no warning).
    fn record(&self, host: &str, found: &Found, ran: bool) {
        if found.is_err() {
            self.0
                .metrics
                .host_lookup_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut table = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = table.hosts.get_mut(host) else {
            return;
        };
        entry.pending = None;
        let failing = entry.failed.take().is_some();
        if ran {
            entry.unanswered = matches!(found, Err(LookupFailed::ResolverDown));
        }
        match found {
            Ok(ips) => {
                entry.known = Some((Arc::clone(ips), Instant::now()));
                if failing {
                    tracing::info!(host, "webhook host looked up again");
                }
            }
            // The host is gone: its old addresses are no one's to use.
            Err(LookupFailed::NoAddress) => entry.known = None,
            Err(LookupFailed::ResolverDown) => {
                entry.failed = Some(Instant::now());
                if !failing && ran {
                    tracing::warn!(
                        host,
                        "webhook host could not be looked up: the DNS resolver failed or did \
                         not answer; its last addresses serve within --delivery-dns-stale-s, \
                         else its deliveries wait"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline a caller of `find` has: [`RESOLVE_TIMEOUT`] from now.
    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + RESOLVE_TIMEOUT
    }

    /// The organization configuring URLs, unless a test says otherwise.
    const ORG: OrgId = OrgId(uuid::Uuid::from_u128(1));

    /// A resolver the test sets: what it answers now, how long it takes, and how often it was
    /// asked.
    #[derive(Clone)]
    struct Resolver {
        answer: Arc<Mutex<Result<Vec<IpAddr>, LookupFailed>>>,
        delay: Arc<Mutex<Duration>>,
        asked: Arc<AtomicUsize>,
        /// Lookups running now, and the most that ever ran at once.
        running: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        /// Hosts named `*.dead.test` get no answer, after this long.
        dead_after: Arc<Mutex<Duration>>,
        /// Lookups of those running now, and the most that ever ran at once.
        dead_running: Arc<AtomicUsize>,
        dead_most: Arc<AtomicUsize>,
    }

    impl Resolver {
        fn new() -> Resolver {
            Resolver {
                answer: Arc::new(Mutex::new(Ok(vec!["192.0.2.1".parse().unwrap()]))),
                delay: Arc::new(Mutex::new(Duration::ZERO)),
                asked: Arc::new(AtomicUsize::new(0)),
                running: Arc::new(AtomicUsize::new(0)),
                most: Arc::new(AtomicUsize::new(0)),
                dead_after: Arc::new(Mutex::new(Duration::ZERO)),
                dead_running: Arc::new(AtomicUsize::new(0)),
                dead_most: Arc::new(AtomicUsize::new(0)),
            }
        }

        fn answers(&self, a: Result<Vec<&str>, LookupFailed>) {
            *self.answer.lock().unwrap() =
                a.map(|v| v.iter().map(|s| s.parse().unwrap()).collect());
        }

        fn hosts(&self, fresh_ms: u64, stale_ms: u64) -> (Hosts, Arc<Metrics>) {
            let me = self.clone();
            let metrics = Metrics::new(&[("GET", "/")], 1);
            let hosts = Hosts::with_lookup(
                Duration::from_millis(fresh_ms),
                Duration::from_millis(stale_ms),
                Arc::clone(&metrics),
                Box::new(move |host| {
                    me.asked.fetch_add(1, Ordering::SeqCst);
                    let now = me.running.fetch_add(1, Ordering::SeqCst) + 1;
                    me.most.fetch_max(now, Ordering::SeqCst);
                    let answer = if host.ends_with(".dead.test") {
                        let now = me.dead_running.fetch_add(1, Ordering::SeqCst) + 1;
                        me.dead_most.fetch_max(now, Ordering::SeqCst);
                        let after = *me.dead_after.lock().unwrap();
                        std::thread::sleep(after);
                        me.dead_running.fetch_sub(1, Ordering::SeqCst);
                        Err(LookupFailed::ResolverDown)
                    } else {
                        let delay = *me.delay.lock().unwrap();
                        std::thread::sleep(delay);
                        me.answer.lock().unwrap().clone()
                    };
                    me.running.fetch_sub(1, Ordering::SeqCst);
                    answer
                }),
            );
            (hosts, metrics)
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::SeqCst)
        }
    }

    fn ips(found: &Result<(Arc<[IpAddr]>, Source), LookupFailed>) -> Vec<String> {
        found
            .as_ref()
            .unwrap()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_is_looked_up_once_while_fresh_and_again_after() {
        let r = Resolver::new();
        let (hosts, metrics) = r.hosts(300, 0);
        for _ in 0..5 {
            let found = hosts.find("a.test", true, None, soon()).await;
            assert_eq!(ips(&found), ["192.0.2.1"]);
            assert_eq!(found.unwrap().1, Source::Fresh);
        }
        assert_eq!(r.asked(), 1);
        // Another host has a lookup of its own.
        hosts.find("b.test", true, None, soon()).await.unwrap();
        assert_eq!(r.asked(), 2);
        // Past `fresh`, the host is looked up again and its new addresses are used.
        r.answers(Ok(vec!["192.0.2.2", "2001:db8::2"]));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            ips(&hosts.find("a.test", true, None, soon()).await),
            ["192.0.2.2", "2001:db8::2"]
        );
        assert_eq!(r.asked(), 3);
        assert_eq!(metrics.host_lookups.load(Ordering::Relaxed), 3);

        // Fresh 0: a lookup each time.
        let (hosts, _) = r.hosts(0, 0);
        for _ in 0..3 {
            hosts.find("a.test", true, None, soon()).await.unwrap();
        }
        assert_eq!(r.asked(), 6);
    }

    /// Many hosts whose DNS servers do not answer looked up at once: at most
    /// [`LOOKUPS_AT_ONCE`] lookups hold a blocking thread, the rest are answered at once as
    /// unanswered and not run, and other blocking work (API keys' hashes) goes on at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_hosts_that_do_not_answer_holds_a_bounded_number_of_threads() {
        let r = Resolver::new();
        *r.delay.lock().unwrap() = RESOLVE_TIMEOUT + Duration::from_secs(1);
        let (hosts, metrics) = r.hosts(30_000, 0);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let hosts = hosts.clone();
            tasks.push(tokio::spawn(async move {
                hosts
                    .find(&format!("h{i}.flood.test"), false, None, soon())
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let other = Instant::now();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        assert!(
            other.elapsed() < Duration::from_millis(500),
            "{:?}",
            other.elapsed()
        );
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(LookupFailed::ResolverDown));
        }
        // Every caller answered when it stopped waiting, or at once.
        assert!(started.elapsed() < RESOLVE_TIMEOUT + Duration::from_millis(900));
        assert_eq!(r.most.load(Ordering::SeqCst), LOOKUPS_AT_ONCE);
        // The lookups that ran end (with an answer, late); the others were never run, and
        // count as unanswered.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(r.asked(), LOOKUPS_AT_ONCE);
        assert_eq!(
            metrics.host_lookup_failures.load(Ordering::Relaxed),
            200 - LOOKUPS_AT_ONCE as u64
        );
        // A host asked again later gets a lookup of its own at once.
        *r.delay.lock().unwrap() = Duration::ZERO;
        tokio::time::sleep(FAILURE_KEPT).await;
        assert_eq!(
            ips(&hosts.find("h7.flood.test", false, None, soon()).await),
            ["192.0.2.1"]
        );
    }

    /// Hosts whose DNS died, asked again and again as their deliveries come due, hold at most
    /// [`LOOKUPS_UNANSWERED_MAX`] lookups: hosts that answer are looked up at once meanwhile.
    /// Before, 100 such hosts held all [`LOOKUPS_AT_ONCE`], and every other host without fresh
    /// addresses was answered "unanswered" without a lookup (its deliveries waited, unsent).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_that_stopped_answering_leave_lookups_for_hosts_that_answer() {
        let r = Resolver::new();
        let (hosts, metrics) = r.hosts(30_000, 0);
        let dead = |i| format!("h{i}.dead.test");
        // Each dead host's first lookup ran and got no answer.
        for i in 0..100 {
            assert_eq!(
                hosts.find(&dead(i), true, None, soon()).await,
                Err(LookupFailed::ResolverDown)
            );
        }
        *r.dead_after.lock().unwrap() = RESOLVE_TIMEOUT + Duration::from_secs(1);
        tokio::time::sleep(FAILURE_KEPT).await;
        let asked = r.asked();
        let mut again = Vec::new();
        for i in 0..100 {
            let (hosts, host) = (hosts.clone(), dead(i));
            again.push(tokio::spawn(async move {
                hosts.find(&host, true, None, soon()).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.asked() - asked, LOOKUPS_UNANSWERED_MAX);
        // Hosts that answer, none looked up before: each gets a lookup, at once.
        let started = Instant::now();
        for i in 0..16 {
            let found = hosts
                .find(&format!("h{i}.live.test"), true, None, soon())
                .await;
            assert_eq!(ips(&found), ["192.0.2.1"], "host {i}");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        for t in again {
            assert_eq!(t.await.unwrap(), Err(LookupFailed::ResolverDown));
        }
        assert_eq!(r.dead_most.load(Ordering::SeqCst), LOOKUPS_UNANSWERED_MAX);
        // The lookups still running end and give their slots back.
        tokio::time::sleep(Duration::from_millis(1500) + FAILURE_KEPT).await;
        assert_eq!(hosts.0.running_unanswered.load(Ordering::SeqCst), 0);
        assert_eq!(hosts.0.running.load(Ordering::SeqCst), 0);
        // 100 first lookups, 32 run again and 68 not run: all unanswered.
        assert_eq!(metrics.host_lookup_failures.load(Ordering::Relaxed), 200);
    }

    /// One organization configuring URLs on new names whose DNS servers do not answer runs at
    /// most [`LOOKUPS_PER_ORG_MAX`] lookups (each holds its slot for as long as the resolver
    /// tries, longer than its check waits); its other checks wait for one of them, within
    /// [`RESOLVE_TIMEOUT`] in all. Another organization's checks and the connections' lookups
    /// go on at once. Before, each check ran a lookup of its own, up to [`LOOKUPS_AT_ONCE`].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_organizations_url_checks_run_a_bounded_number_of_lookups() {
        let r = Resolver::new();
        *r.dead_after.lock().unwrap() = RESOLVE_TIMEOUT + Duration::from_secs(1);
        let (hosts, _) = r.hosts(30_000, 0);
        let other = OrgId(uuid::Uuid::from_u128(2));
        let url = |host: String| crate::url_policy::parse_url(&format!("https://{host}/")).unwrap();
        let started = Instant::now();
        let mut checks = Vec::new();
        for i in 0..20 {
            let (hosts, u) = (hosts.clone(), url(format!("h{i}.dead.test")));
            checks.push(tokio::spawn(async move {
                hosts.resolve(&u, true, Use::Configure(ORG)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.dead_running.load(Ordering::SeqCst), LOOKUPS_PER_ORG_MAX);
        // Another organization's checks and new connections' lookups, at once.
        for i in 0..8 {
            let u = url(format!("h{i}.other.test"));
            hosts
                .resolve(&u, true, Use::Configure(other))
                .await
                .unwrap();
            let u = url(format!("h{i}.connect.test"));
            hosts.resolve(&u, true, Use::Connect).await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        for c in checks {
            assert!(matches!(c.await.unwrap(), Err(Unresolved::ResolverDown(_))));
        }
        let waited = started.elapsed();
        assert!(
            waited >= RESOLVE_TIMEOUT && waited < RESOLVE_TIMEOUT + Duration::from_millis(900),
            "{waited:?}"
        );
        assert_eq!(r.dead_most.load(Ordering::SeqCst), LOOKUPS_PER_ORG_MAX);
        // Its lookups end and give the organization's slots back.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let u = url("a.test".to_string());
        hosts.resolve(&u, true, Use::Configure(ORG)).await.unwrap();
        assert_eq!(r.asked(), LOOKUPS_PER_ORG_MAX + 16 + 1);
    }

    /// Many organizations configuring URLs on new names whose DNS servers do not answer run at
    /// most [`LOOKUPS_CONFIGURE_MAX`] lookups together; a check beyond them is answered at once
    /// as unanswered (a 503). Connections to hosts with no addresses kept still get lookups of
    /// their own, at once. Before, twenty organizations' checks (four each) held all
    /// [`LOOKUPS_AT_ONCE`] and such a connection's lookup was not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_organizations_url_checks_leave_lookups_for_connections() {
        let r = Resolver::new();
        *r.dead_after.lock().unwrap() = RESOLVE_TIMEOUT + Duration::from_secs(1);
        let (hosts, _) = r.hosts(30_000, 0);
        let url = |host: String| crate::url_policy::parse_url(&format!("https://{host}/")).unwrap();
        let mut checks = Vec::new();
        for org in 0..20u128 {
            for i in 0..LOOKUPS_PER_ORG_MAX {
                let (hosts, u) = (hosts.clone(), url(format!("h{org}-{i}.dead.test")));
                checks.push(tokio::spawn(async move {
                    hosts
                        .resolve(&u, true, Use::Configure(OrgId(uuid::Uuid::from_u128(org))))
                        .await
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.dead_running.load(Ordering::SeqCst), LOOKUPS_CONFIGURE_MAX);
        let started = Instant::now();
        for i in 0..16 {
            let u = url(format!("h{i}.connect.test"));
            let found = hosts.resolve(&u, true, Use::Connect).await;
            assert_eq!(found.unwrap().len(), 1, "connection {i}");
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        // Every check is a 503: those beyond the bound at once, the others after their wait.
        for c in checks {
            assert!(matches!(c.await.unwrap(), Err(Unresolved::ResolverDown(_))));
        }
        assert_eq!(r.dead_most.load(Ordering::SeqCst), LOOKUPS_CONFIGURE_MAX);
        // The lookups end and give every slot back.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(hosts.0.running_configure.load(Ordering::SeqCst), 0);
        assert_eq!(hosts.0.running.load(Ordering::SeqCst), 0);
        let u = url("a.test".to_string());
        hosts.resolve(&u, true, Use::Configure(ORG)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_needing_a_host_at_once_share_one_lookup() {
        let r = Resolver::new();
        *r.delay.lock().unwrap() = Duration::from_millis(200);
        let (hosts, _) = r.hosts(30_000, 0);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let hosts = hosts.clone();
            tasks.push(tokio::spawn(async move {
                hosts.find("a.test", true, None, soon()).await
            }));
        }
        for t in tasks {
            assert_eq!(ips(&t.await.unwrap()), ["192.0.2.1"]);
        }
        assert_eq!(r.asked(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resolver_that_does_not_answer_holds_one_thread_not_one_per_connection() {
        let r = Resolver::new();
        // Longer than a caller waits (RESOLVE_TIMEOUT, 3 s).
        *r.delay.lock().unwrap() = RESOLVE_TIMEOUT + Duration::from_secs(1);
        let (hosts, metrics) = r.hosts(30_000, 0);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let hosts = hosts.clone();
            tasks.push(tokio::spawn(async move {
                hosts.find("slow.test", true, None, soon()).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(LookupFailed::ResolverDown));
        }
        let waited = started.elapsed();
        assert!(
            waited >= RESOLVE_TIMEOUT && waited < RESOLVE_TIMEOUT + Duration::from_millis(900),
            "{waited:?}"
        );
        // A connection after the callers gave up is not held for the lookup still under way.
        let asked_at = Instant::now();
        let later = hosts.find("slow.test", true, None, soon()).await;
        assert_eq!(later, Err(LookupFailed::ResolverDown));
        assert!(asked_at.elapsed() < Duration::from_millis(200));
        // A URL being configured waits for it, and its answer then serves connections.
        let configured = hosts.find("slow.test", false, None, soon()).await;
        assert_eq!(configured.map(|f| f.1), Ok(Source::Fresh));
        hosts.find("slow.test", true, None, soon()).await.unwrap();
        assert_eq!(r.asked(), 1);
        assert_eq!(metrics.host_lookup_failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_resolver_fails_the_last_addresses_serve_until_stale_runs_out() {
        let r = Resolver::new();
        let (hosts, metrics) = r.hosts(100, 1500);
        hosts.find("a.test", true, None, soon()).await.unwrap();
        r.answers(Err(LookupFailed::ResolverDown));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let found = hosts.find("a.test", true, None, soon()).await;
        assert_eq!(ips(&found), ["192.0.2.1"]);
        assert_eq!(found.unwrap().1, Source::Stale);
        assert_eq!(metrics.host_stale.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.host_lookup_failures.load(Ordering::Relaxed), 1);
        // Within a second of the failure it is the answer: no lookup per connection.
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await.unwrap().1,
            Source::Stale
        );
        assert_eq!(r.asked(), 2);
        // Past fresh + stale: the resolver's failure is the answer.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await,
            Err(LookupFailed::ResolverDown)
        );
        assert_eq!(r.asked(), 3);
        // The resolver is back: fresh addresses again, a second after the last failure.
        r.answers(Ok(vec!["192.0.2.3"]));
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await,
            Err(LookupFailed::ResolverDown)
        );
        tokio::time::sleep(FAILURE_KEPT).await;
        assert_eq!(
            ips(&hosts.find("a.test", true, None, soon()).await),
            ["192.0.2.3"]
        );
        assert_eq!(r.asked(), 4);

        // Stale 0: a failure is a failure as soon as the addresses are not fresh.
        let (hosts, _) = r.hosts(100, 0);
        hosts.find("a.test", true, None, soon()).await.unwrap();
        r.answers(Err(LookupFailed::ResolverDown));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await,
            Err(LookupFailed::ResolverDown)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_found_to_have_no_address_loses_its_old_addresses() {
        let r = Resolver::new();
        let (hosts, _) = r.hosts(100, 60_000);
        hosts.find("a.test", true, None, soon()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        r.answers(Err(LookupFailed::NoAddress));
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await,
            Err(LookupFailed::NoAddress)
        );
        // Then the resolver fails: nothing old to serve.
        r.answers(Err(LookupFailed::ResolverDown));
        assert_eq!(
            hosts.find("a.test", true, None, soon()).await,
            Err(LookupFailed::ResolverDown)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_url_being_configured_is_looked_up_anew_and_its_answer_serves_connections() {
        let r = Resolver::new();
        let (hosts, _) = r.hosts(30_000, 60_000);
        let url = crate::url_policy::parse_url("https://a.test/in").unwrap();
        let configure = || hosts.resolve(&url, true, Use::Configure(ORG));
        assert_eq!(
            configure().await.unwrap(),
            ["192.0.2.1:443".parse().unwrap()]
        );
        // A connection then needs no lookup of its own.
        hosts.resolve(&url, true, Use::Connect).await.unwrap();
        assert_eq!(r.asked(), 1);
        // Configured again: asked again, and a failure is the answer, whatever is kept.
        r.answers(Err(LookupFailed::ResolverDown));
        assert!(matches!(
            configure().await,
            Err(Unresolved::ResolverDown(_))
        ));
        r.answers(Err(LookupFailed::NoAddress));
        assert!(matches!(configure().await, Err(Unresolved::Refused(_))));
        assert_eq!(r.asked(), 3);
    }

    /// The hosts kept are bounded: past three quarters of the bound, hosts only URL checks asked
    /// for go first, so a tenant changing its endpoint's URL to ever new names (each a URL check
    /// whose answer was kept for fresh + stale, an hour) cannot grow the table without end nor
    /// push out the hosts deliveries use; when those alone pass it, the ones asked for longest
    /// ago go. Before, 5,010 hosts looked up within the hour were all kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hosts_kept_are_bounded_and_those_deliveries_use_stay() {
        let r = Resolver::new();
        let (hosts, _) = r.hosts(30_000, 3_600_000);
        {
            let mut table = hosts.0.entries.lock().unwrap();
            (table.kept_max, table.sweep_at) = (1000, 1000);
        }
        let url = |host: String| crate::url_policy::parse_url(&format!("https://{host}/")).unwrap();
        let len = || hosts.0.entries.lock().unwrap().hosts.len();
        let connect = |host: String| {
            let (hosts, u) = (hosts.clone(), url(host));
            async move { hosts.resolve(&u, true, Use::Connect).await }
        };
        for i in 0..10 {
            connect(format!("h{i}.connect.test")).await.unwrap();
        }
        for i in 0..5000 {
            let u = url(format!("h{i}.check.test"));
            hosts.resolve(&u, true, Use::Configure(ORG)).await.unwrap();
            assert!(len() <= 1000, "{}", len());
        }
        // The connections' hosts are still kept: answered without a lookup.
        let asked = r.asked();
        for i in 0..10 {
            connect(format!("h{i}.connect.test")).await.unwrap();
        }
        assert_eq!(r.asked(), asked);
        // Connections' hosts alone past the bound: those asked for longest ago go.
        for i in 0..3000 {
            connect(format!("h{i}.many.test")).await.unwrap();
            assert!(len() <= 1000, "{}", len());
        }
        let asked = r.asked();
        connect("h2999.many.test".to_string()).await.unwrap();
        assert_eq!(r.asked(), asked, "the latest host is kept");
        connect("h0.connect.test".to_string()).await.unwrap();
        assert_eq!(r.asked(), asked + 1, "the oldest one went");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_too_old_to_use_are_swept_as_the_table_grows() {
        let r = Resolver::new();
        let (hosts, _) = r.hosts(0, 0);
        for n in 0..SWEEP_FIRST + 10 {
            hosts
                .find(&format!("h{n}.test"), true, None, soon())
                .await
                .unwrap();
        }
        let table = hosts.0.entries.lock().unwrap();
        assert!(table.hosts.len() < 20, "{}", table.hosts.len());
        assert_eq!(table.sweep_at, SWEEP_FIRST);
    }

    #[test]
    fn literal_addresses_are_checked_without_dns_and_a_missing_host_as_a_forbidden_one() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let hosts = Hosts::new(
            Duration::from_secs(30),
            Duration::ZERO,
            Metrics::new(&[("GET", "/")], 1),
        );
        rt.block_on(async {
            let u = crate::url_policy::parse_url("http://127.0.0.1:9/x").unwrap();
            let refused = hosts
                .resolve(&u, false, Use::Configure(ORG))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("does not resolve to a public address"),
                "{refused}"
            );
            assert!(!refused.contains("127.0.0.1:9"), "{refused}");
            // A name that does not resolve gets the same sentence: no DNS oracle.
            // Asked of this machine's DNS, which may fail for now: asked again then.
            let nx = crate::url_policy::parse_url("http://no-such-host.invalid/x").unwrap();
            let mut nx_refused = None;
            for _ in 0..3 {
                match hosts.resolve(&nx, false, Use::Configure(ORG)).await {
                    Err(Unresolved::Refused(m)) => {
                        nx_refused = Some(m);
                        break;
                    }
                    Err(Unresolved::ResolverDown(_)) => {
                        tokio::time::sleep(Duration::from_secs(1)).await
                    }
                    other => panic!("{other:?}"),
                }
            }
            let nx_refused = nx_refused.expect("the resolver failed three times");
            assert_eq!(
                nx_refused.replace("no-such-host.invalid", "H"),
                refused.replace("127.0.0.1", "H")
            );
            assert_eq!(
                hosts.resolve(&u, true, Use::Configure(ORG)).await.unwrap(),
                vec!["127.0.0.1:9".parse().unwrap()]
            );
        });
    }
}
