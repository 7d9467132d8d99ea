//! Bounds on what peers can make the front ends hold: state kept per source address with a cap
//! per source and in total (oldest first out), connection slots per source, and a request rate
//! per source. Written once for every door; no sockets and no clock of their own (`now` is
//! passed in), so that they are tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A key that belongs to one source address (the IP address: a hostile peer has as many ports
/// as it likes).
pub trait Sourced: Clone + Eq + Hash {
    /// The address whose share this key counts against.
    fn source(&self) -> IpAddr;
}

impl Sourced for IpAddr {
    fn source(&self) -> IpAddr {
        *self
    }
}

impl Sourced for SocketAddr {
    fn source(&self) -> IpAddr {
        self.ip()
    }
}

impl<T: Clone + Eq + Hash> Sourced for (SocketAddr, T) {
    fn source(&self) -> IpAddr {
        self.0.ip()
    }
}

/// Entries kept for peers, at most `per_source` for one source address and `total` in all;
/// making room removes the oldest entry (of that source first, then of all). "Oldest" is the
/// least recently inserted or [`touch`](PerSource::touch)ed.
pub struct PerSource<K: Sourced, V> {
    entries: HashMap<K, Entry<V>>,
    /// Every entry by its sequence number, oldest first.
    order: BTreeMap<u64, K>,
    /// Each source's entries by sequence number, oldest first.
    by_source: HashMap<IpAddr, BTreeMap<u64, K>>,
    next: u64,
    per_source: usize,
    total: usize,
}

struct Entry<V> {
    seq: u64,
    at: Instant,
    value: V,
}

impl<K: Sourced, V> PerSource<K, V> {
    /// An empty set with these caps (each at least 1).
    pub fn new(per_source: usize, total: usize) -> Self {
        PerSource {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            by_source: HashMap::new(),
            next: 0,
            per_source: per_source.max(1),
            total: total.max(1),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries held for `source`.
    pub fn len_of(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).map_or(0, BTreeMap::len)
    }

    /// The value at `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// The value at `key`, to change in place (its age unchanged).
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|e| &mut e.value)
    }

    /// Puts `value` at `key` as the newest entry, replacing what was there; returns how many
    /// other entries were removed to make room.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> usize {
        self.remove(&key);
        let source = key.source();
        let mut evicted = 0;
        while self.len_of(source) >= self.per_source {
            let oldest = self
                .by_source
                .get(&source)
                .and_then(|m| m.values().next().cloned());
            match oldest {
                Some(k) if self.remove(&k).is_some() => evicted += 1,
                _ => break,
            }
        }
        while self.entries.len() >= self.total {
            match self.order.values().next().cloned() {
                Some(k) if self.remove(&k).is_some() => evicted += 1,
                _ => break,
            }
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, key.clone());
        self.by_source
            .entry(source)
            .or_default()
            .insert(seq, key.clone());
        self.entries.insert(
            key,
            Entry {
                seq,
                at: now,
                value,
            },
        );
        evicted
    }

    /// Makes the entry at `key` the newest (it was just used).
    pub fn touch(&mut self, key: &K, now: Instant) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let seq = self.next;
        self.next += 1;
        let old = std::mem::replace(&mut e.seq, seq);
        e.at = now;
        self.order.remove(&old);
        self.order.insert(seq, key.clone());
        if let Some(m) = self.by_source.get_mut(&key.source()) {
            m.remove(&old);
            m.insert(seq, key.clone());
        }
    }

    /// Removes the entry at `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.order.remove(&e.seq);
        let source = key.source();
        if let Some(m) = self.by_source.get_mut(&source) {
            m.remove(&e.seq);
            if m.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(e.value)
    }

    /// When the oldest entry was inserted or last touched; `None` when empty.
    pub fn oldest_at(&self) -> Option<Instant> {
        let key = self.order.values().next()?;
        self.entries.get(key).map(|e| e.at)
    }

    /// Removes the entries inserted or touched `lifetime` or longer before `now`; returns how
    /// many.
    pub fn expire(&mut self, now: Instant, lifetime: Duration) -> usize {
        let mut n = 0;
        loop {
            let Some(k) = self.order.values().next().cloned() else {
                break;
            };
            let old = self
                .entries
                .get(&k)
                .is_some_and(|e| now.saturating_duration_since(e.at) >= lifetime);
            if !old || self.remove(&k).is_none() {
                break;
            }
            n += 1;
        }
        n
    }
}

/// Connection slots of one listener: at most `total` connections at once, and at most
/// `per_source` from one source address. A slot is taken after the connection is accepted
/// (so that the kernel's backlog never holds a well-behaved client behind a flood) and given
/// back when its [`Slot`] is dropped.
#[derive(Debug, Clone)]
pub struct Slots {
    inner: Arc<Mutex<SlotCounts>>,
}

#[derive(Debug)]
struct SlotCounts {
    by_source: HashMap<IpAddr, usize>,
    in_use: usize,
    per_source: usize,
    total: usize,
}

/// A connection slot, held while the connection is served.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    source: IpAddr,
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Its source holds its share.
    Source,
    /// The listener is full.
    Listener,
}

impl Slots {
    /// Slots for one listener.
    pub fn new(per_source: usize, total: usize) -> Self {
        Slots {
            inner: Arc::new(Mutex::new(SlotCounts {
                by_source: HashMap::new(),
                in_use: 0,
                per_source: per_source.max(1),
                total: total.max(1),
            })),
        }
    }

    /// A slot for a connection from `source`, if its share and the listener allow one.
    pub fn take(&self, source: IpAddr) -> Result<Slot, NoSlot> {
        let mut c = lock(&self.inner);
        if c.in_use >= c.total {
            return Err(NoSlot::Listener);
        }
        let per_source = c.per_source;
        let n = c.by_source.entry(source).or_insert(0);
        if *n >= per_source {
            return Err(NoSlot::Source);
        }
        *n += 1;
        c.in_use += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Connections held now.
    pub fn in_use(&self) -> usize {
        lock(&self.inner).in_use
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.slots.inner);
        c.in_use = c.in_use.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

/// Requests per second allowed from one source address: a token bucket per source holding up
/// to `burst` requests, refilled at `rate` per second. The buckets are themselves bounded
/// (`sources` of them, the least recently used forgotten first: a forgotten source starts
/// again with a full bucket). `rate` 0 turns the limit off.
#[derive(Debug)]
pub struct SourceRate {
    rate: u32,
    burst: u32,
    buckets: Mutex<PerSource<IpAddr, Bucket>>,
}

impl<K: Sourced, V> std::fmt::Debug for PerSource<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerSource")
            .field("len", &self.len())
            .field("per_source", &self.per_source)
            .field("total", &self.total)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl SourceRate {
    /// `rate` requests per second from one source, bursts of `burst`, for at most `sources`
    /// sources remembered at once.
    pub fn new(rate: u32, burst: u32, sources: usize) -> Self {
        SourceRate {
            rate,
            burst: burst.max(rate).max(1),
            buckets: Mutex::new(PerSource::new(1, sources)),
        }
    }

    /// Takes one request from `source`'s bucket; `Err(seconds)`, whole seconds until the next
    /// request is allowed (at least 1), when it is empty.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), u32> {
        self.check_cost(source, now, 1)
    }

    /// Takes `cost` requests from `source`'s bucket (a TLS handshake's price), or none when it
    /// holds fewer; `Err(seconds)` as [`SourceRate::check`]. A cost of 0 is always allowed.
    pub fn check_cost(&self, source: IpAddr, now: Instant, cost: u32) -> Result<(), u32> {
        if self.rate == 0 || cost == 0 {
            return Ok(());
        }
        let need = f64::from(cost);
        let (rate, cap) = (f64::from(self.rate), f64::from(self.burst));
        let mut buckets = lock(&self.buckets);
        let mut b = buckets.get(&source).copied().unwrap_or(Bucket {
            tokens: cap,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(cap);
        b.at = now;
        let verdict = if b.tokens >= need {
            b.tokens -= need;
            Ok(())
        } else {
            // ceil of a value in (0, need / rate]: at least 1 s, a whole number for
            // Retry-After and Max-Age.
            Err((((need - b.tokens) / rate).ceil() as u32).max(1))
        };
        if let Some(slot) = buckets.get_mut(&source) {
            *slot = b;
            buckets.touch(&source, now);
        } else {
            buckets.insert(source, b, now);
        }
        verdict
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters and buckets stay meaningful whatever a panicking holder left half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn peer(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn per_source_evicts_that_sources_oldest_then_the_oldest_of_all() {
        let now = Instant::now();
        let mut m: PerSource<(SocketAddr, u8), u32> = PerSource::new(2, 3);
        assert_eq!(m.insert((peer([10, 0, 0, 1], 1), 0), 1, now), 0);
        assert_eq!(m.insert((peer([10, 0, 0, 1], 2), 0), 2, now), 0);
        // A third from the same source pushes out its oldest.
        assert_eq!(m.insert((peer([10, 0, 0, 1], 3), 0), 3, now), 1);
        assert!(m.get(&(peer([10, 0, 0, 1], 1), 0)).is_none());
        assert_eq!(m.len_of(peer([10, 0, 0, 1], 0).ip()), 2);
        // Another source: the total (3) is reached, not exceeded.
        assert_eq!(m.insert((peer([10, 0, 0, 2], 1), 0), 4, now), 0);
        // Touched entries are young again: the untouched one from 10.0.0.1 goes.
        m.touch(&(peer([10, 0, 0, 1], 2), 0), now);
        assert_eq!(m.insert((peer([10, 0, 0, 3], 1), 0), 5, now), 1);
        assert!(m.get(&(peer([10, 0, 0, 1], 3), 0)).is_none());
        assert_eq!(m.get(&(peer([10, 0, 0, 1], 2), 0)), Some(&2));
        assert_eq!(m.len(), 3);
        // Replacing a key is no eviction.
        assert_eq!(m.insert((peer([10, 0, 0, 3], 1), 0), 6, now), 0);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m.expire(now + Duration::from_secs(5), Duration::from_secs(5)),
            3
        );
        assert!(m.is_empty());
        assert!(m.by_source.is_empty() && m.order.is_empty());
    }

    #[test]
    fn slots_are_shared_per_source_and_given_back() {
        let slots = Slots::new(2, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).unwrap_err(), NoSlot::Source);
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).unwrap_err(), NoSlot::Listener);
        drop(a1);
        assert_eq!(slots.in_use(), 2);
        let _b2 = slots.take(b).unwrap();
    }

    #[test]
    fn the_rate_refills_and_says_when_to_return() {
        let t0 = Instant::now();
        let r = SourceRate::new(2, 4, 10);
        let a: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..4 {
            r.check(a, t0).unwrap();
        }
        assert_eq!(r.check(a, t0), Err(1));
        // Another source has its own bucket.
        r.check([10, 0, 0, 2].into(), t0).unwrap();
        // Half a second brings one back at 2 per second.
        r.check(a, t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(r.check(a, t0 + Duration::from_millis(500)), Err(1));
        // A handshake's cost: taken whole or not at all; 0 is free.
        let c: IpAddr = [10, 0, 0, 3].into();
        r.check_cost(c, t0, 3).unwrap();
        assert_eq!(r.check_cost(c, t0, 3), Err(1));
        r.check(c, t0).unwrap();
        r.check_cost(c, t0, 0).unwrap();
        assert_eq!(r.check(c, t0), Err(1));
        // Off.
        let off = SourceRate::new(0, 0, 10);
        for _ in 0..100 {
            off.check(a, t0).unwrap();
        }
    }
}
