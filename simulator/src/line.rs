//! The line stations the simulator plays: generated and registered by the simulator for the
//! embedded CA, or read from files for a CA that runs elsewhere (registered there beforehand
//! with `ca-server line add`). Devices take the stations' serials in order.

use std::path::{Path, PathBuf};

use protocol_spec::{DeviceSerial, KeyPair};
use ring::rand::SystemRandom;

/// A line station the simulator plays.
pub struct LineStation {
    /// Line id, as registered with the CA.
    pub id: String,
    /// Its key.
    pub key: KeyPair,
    /// First serial it vouches for.
    pub first: u64,
    /// Last serial it vouches for (inclusive).
    pub last: u64,
}

impl LineStation {
    /// Serials in its range.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// The stations of a run, in order: device 0 takes the first serial of the first station,
/// and each station's range is used up before the next one's.
pub struct Lines {
    stations: Vec<LineStation>,
    /// Index of the first device of each station.
    offsets: Vec<u64>,
}

impl Lines {
    /// The stations, in the order their serials are used.
    pub fn new(stations: Vec<LineStation>) -> Self {
        let mut offsets = Vec::with_capacity(stations.len());
        let mut next = 0u64;
        for s in &stations {
            offsets.push(next);
            next = next.saturating_add(s.len());
        }
        Lines { stations, offsets }
    }

    /// Serials over all stations.
    pub fn capacity(&self) -> u64 {
        self.stations
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.len()))
    }

    /// The station and serial of device `index` (from 0), if the stations cover it.
    pub fn for_device(&self, index: u64) -> Option<(&LineStation, DeviceSerial)> {
        let k = self
            .offsets
            .partition_point(|&o| o <= index)
            .checked_sub(1)?;
        let station = self.stations.get(k)?;
        let serial = station.first.checked_add(index - self.offsets[k])?;
        if serial > station.last {
            return None;
        }
        Some((station, DeviceSerial::new(serial)?))
    }
}

/// Reads the line stations of a remote CA: `keys[i]` (a `line-station keygen` key file) is
/// line `ids[i]` with serial range `serials[i]` (`FIRST-LAST`). The three lists pair up in
/// order; ranges must not overlap.
pub fn load(keys: &[PathBuf], ids: &[String], serials: &[String]) -> Result<Lines, String> {
    if keys.is_empty() {
        return Err(
            "--ca needs the line station to play: --line-key LINE.key --line-id ID --serials FIRST-LAST \
             (the line registered on that CA with `ca-server line add`)"
                .into(),
        );
    }
    if keys.len() != ids.len() || keys.len() != serials.len() {
        return Err(format!(
            "give one --line-id and one --serials per --line-key (got {} --line-key, {} --line-id, {} --serials)",
            keys.len(),
            ids.len(),
            serials.len()
        ));
    }
    let rng = SystemRandom::new();
    let mut stations: Vec<LineStation> = Vec::new();
    for ((path, id), range) in keys.iter().zip(ids).zip(serials) {
        ca_server::lines::check_id(id).map_err(|e| format!("--line-id {id:?}: {e}"))?;
        if stations.iter().any(|s| &s.id == id) {
            return Err(format!("--line-id {id:?} is given twice"));
        }
        let (first, last) =
            ca_server::lines::parse_range(range).map_err(|e| format!("--serials {range}: {e}"))?;
        if let Some(s) = stations.iter().find(|s| first <= s.last && s.first <= last) {
            return Err(format!(
                "--serials {range} (line {id}) overlaps --serials {}-{} (line {}): a serial \
                 belongs to one line",
                s.first, s.last, s.id
            ));
        }
        stations.push(LineStation {
            id: id.clone(),
            key: read_key(path, &rng)?,
            first,
            last,
        });
    }
    Ok(Lines::new(stations))
}

/// Reads a line key as the `line-station` tool does (a PKCS#8 `PRIVATE KEY` PEM, Ed25519 or
/// P-256, as `line-station keygen` writes it).
fn read_key(path: &Path, rng: &SystemRandom) -> Result<KeyPair, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--line-key {}: {e}", path.display()))?;
    KeyPair::from_pem(&text, rng).map_err(|e| {
        format!(
            "--line-key {}: {e} (expected a PRIVATE KEY PEM from `line-station keygen`)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use protocol_spec::KeyAlgorithm;

    fn station(id: &str, first: u64, last: u64) -> LineStation {
        let rng = SystemRandom::new();
        LineStation {
            id: id.into(),
            key: KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap(),
            first,
            last,
        }
    }

    #[test]
    fn devices_take_the_serials_of_each_station_in_turn() {
        let lines = Lines::new(vec![station("a", 700, 701), station("b", 10, 12)]);
        assert_eq!(lines.capacity(), 5);
        let at = |i| lines.for_device(i).map(|(s, n)| (s.id.clone(), n.get()));
        assert_eq!(at(0), Some(("a".into(), 700)));
        assert_eq!(at(1), Some(("a".into(), 701)));
        assert_eq!(at(2), Some(("b".into(), 10)));
        assert_eq!(at(4), Some(("b".into(), 12)));
        assert_eq!(at(5), None);
    }

    #[test]
    fn refuses_unpaired_flags_overlaps_and_unreadable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("line.key");
        let rng = SystemRandom::new();
        let pair = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        std::fs::write(&key, pair.to_pem().as_bytes()).unwrap();
        let k = || key.clone();
        let err = |keys: &[PathBuf], ids: &[&str], ranges: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            let ranges: Vec<String> = ranges.iter().map(|s| s.to_string()).collect();
            load(keys, &ids, &ranges).err().unwrap()
        };
        assert!(err(&[], &[], &[]).contains("--line-key"));
        assert!(err(&[k()], &["l"], &[]).contains("one --serials per --line-key"));
        assert!(err(&[k(), k()], &["a", "b"], &["1-10", "5-20"]).contains("overlaps"));
        assert!(err(&[k()], &["l"], &["10-1"]).contains("--serials 10-1"));
        let missing = dir.path().join("nope.key");
        assert!(err(&[missing], &["l"], &["1-10"]).contains("nope.key"));
        let public = dir.path().join("line.pub.pem");
        std::fs::write(&public, protocol_spec::PublicKey::from(&pair).to_pem()).unwrap();
        assert!(err(&[public], &["l"], &["1-10"]).contains("PRIVATE KEY"));
        let ok = load(&[k()], &["line-7".into()], &["700000-700009".into()]).unwrap();
        assert_eq!(ok.capacity(), 10);
    }
}
