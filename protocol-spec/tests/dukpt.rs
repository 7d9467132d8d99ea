//! AES DUKPT against the X9.24-3-2017 known answers in `vectors/dukpt/`, and the device side
//! against the host side for every counter up to past the first rollover and for random
//! usable counters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use protocol_spec::dukpt::{
    self, AesKey, DukptDevice, InitialKeyId, KeyType, KeyUsage, Ksn, counter_usable,
};
use serde_json::Value;

const VECTORS: &[u8] = include_bytes!("../vectors/dukpt/x9.24-3-2017.json");

fn vectors() -> Value {
    serde_json::from_slice(VECTORS).unwrap()
}

fn bdk(v: &Value, name: &str) -> AesKey {
    AesKey::from_hex(v["bdks"][name].as_str().unwrap()).unwrap()
}

fn upper(key: &AesKey) -> String {
    hex::encode_upper(key.expose())
}

#[test]
fn initial_keys_and_their_kcvs() {
    let v = vectors();
    let id = InitialKeyId::from_hex(v["initial_key_id"].as_str().unwrap()).unwrap();
    let cases = v["initial_keys"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let ik = dukpt::initial_key(&bdk(&v, case["bdk"].as_str().unwrap()), id);
        assert_eq!(upper(&ik), case["initial_key"].as_str().unwrap());
        assert_eq!(
            hex::encode_upper(ik.kcv()),
            case["kcv"].as_str().unwrap(),
            "{case}"
        );
    }
}

#[test]
fn transaction_and_working_keys_host_and_device_side() {
    let v = vectors();
    let id = InitialKeyId::from_hex(v["initial_key_id"].as_str().unwrap()).unwrap();
    let cases = v["transactions"].as_array().unwrap();
    let mut counters = Vec::new();
    for case in cases {
        let bdk = bdk(&v, case["bdk"].as_str().unwrap());
        let counter = u32::from_str_radix(case["counter"].as_str().unwrap(), 16).unwrap();
        counters.push(counter);
        let ksn = Ksn {
            initial_key_id: id,
            counter,
        };
        // Host side: from the BDK and the KSN alone.
        let host = dukpt::host_transaction_key(&bdk, ksn).unwrap();
        assert_eq!(
            upper(&host),
            case["derivation_key"].as_str().unwrap(),
            "{case}"
        );
        // Device side: the register resumed at this counter, then one transaction.
        let mut device = DukptDevice::resume(&dukpt::initial_key(&bdk, id), id, counter).unwrap();
        let t = device.next_transaction().unwrap();
        assert_eq!(t.ksn, ksn);
        assert_eq!(t.key, host);
        for w in case["working_keys"].as_array().unwrap() {
            let usage: KeyUsage = w["usage"].as_str().unwrap().parse().unwrap();
            let key_type = KeyType::from_name(w["type"].as_str().unwrap()).unwrap();
            let host_key = dukpt::host_working_key(&bdk, ksn, usage, key_type).unwrap();
            assert_eq!(upper(&host_key), w["key"].as_str().unwrap(), "{case} {w}");
            assert_eq!(t.working_key(usage, key_type).unwrap(), host_key);
            if let Some(kcv) = w["kcv"].as_str() {
                assert_eq!(hex::encode_upper(host_key.kcv()), kcv);
            }
        }
    }
    for needed in [
        1,
        2,
        3,
        8,
        0x1FFFE,
        0x20000,
        0x20001,
        0xFFFE_2000,
        0xFFFE_8000,
        0xFFFF_0000,
    ] {
        assert!(counters.contains(&needed), "{needed:#x} has no vector");
    }
}

#[test]
fn kcv_known_answers() {
    for case in vectors()["kcv"].as_array().unwrap() {
        let key = AesKey::from_hex(case["key"].as_str().unwrap()).unwrap();
        assert_eq!(
            hex::encode_upper(key.kcv()),
            case["kcv"].as_str().unwrap(),
            "{case}"
        );
    }
}

/// Every transaction from counter 1 to past the rollover at 0x20000 (0x1FFFF has 17 one bits
/// and is skipped), the device stepping through its register, the host deriving each from the
/// BDK: the same key every time.
#[test]
fn device_steps_agree_with_the_host_through_the_first_rollover() {
    for name in ["aes-128", "aes-256"] {
        let v = vectors();
        let bdk = bdk(&v, name);
        let id = InitialKeyId::from_hex("1234567890123456").unwrap();
        let mut device = DukptDevice::load(&dukpt::initial_key(&bdk, id), id);
        let mut expected = 1u32;
        let stride = if name == "aes-128" { 1 } else { 97 };
        while expected <= 0x20001 {
            let t = device.next_transaction().unwrap();
            assert_eq!(t.ksn.counter, expected);
            // AES-256 host derivations are checked on every 97th counter and at the rollover,
            // to keep the test quick; AES-128 on every counter.
            if expected.is_multiple_of(stride) || expected >= 0x1FFF0 {
                assert_eq!(t.key, dukpt::host_transaction_key(&bdk, t.ksn).unwrap());
            }
            expected += 1;
            while !counter_usable(expected) {
                expected += 1;
            }
        }
        assert_eq!(device.next_ksn().unwrap().counter, 0x20002);
    }
}

#[test]
fn the_rollover_skips_exactly_0x1ffff() {
    let bdk = AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").unwrap();
    let id = InitialKeyId::from_hex("1234567890123456").unwrap();
    let mut device = DukptDevice::resume(&dukpt::initial_key(&bdk, id), id, 0x1FFFE).unwrap();
    let seen: Vec<u32> = (0..3)
        .map(|_| device.next_transaction().unwrap().ksn.counter)
        .collect();
    assert_eq!(seen, [0x1FFFE, 0x20000, 0x20001]);
}

#[test]
fn the_last_counters_then_exhaustion() {
    let bdk = AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").unwrap();
    let id = InitialKeyId::from_hex("1234567890123456").unwrap();
    let ik = dukpt::initial_key(&bdk, id);
    // 0xFFFF0000 has 16 one bits: the last usable counter.
    let mut device = DukptDevice::resume(&ik, id, 0xFFFF_0000).unwrap();
    let t = device.next_transaction().unwrap();
    assert_eq!(t.key, dukpt::host_transaction_key(&bdk, t.ksn).unwrap());
    assert!(device.next_ksn().is_none());
    assert!(device.next_transaction().is_err());
}

fn usable_counter() -> impl Strategy<Value = u32> {
    // A set of at most 16 distinct bit positions: every usable counter can come out.
    prop::collection::btree_set(0u32..32, 1..=16)
        .prop_map(|bits| bits.into_iter().fold(0u32, |c, b| c | (1 << b)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// From any usable counter, the device's next transactions equal the host's derivations.
    #[test]
    fn device_and_host_agree_from_any_usable_counter(
        counter in usable_counter(),
        bdk_bytes in prop::array::uniform32(any::<u8>()),
        aes256 in any::<bool>(),
        id in any::<[u8; 8]>(),
    ) {
        let bdk = AesKey::from_bytes(if aes256 { &bdk_bytes[..] } else { &bdk_bytes[..16] }).unwrap();
        let id = InitialKeyId::from_bytes(id);
        let mut device = DukptDevice::resume(&dukpt::initial_key(&bdk, id), id, counter).unwrap();
        for _ in 0..24 {
            let Ok(t) = device.next_transaction() else { break };
            prop_assert!(counter_usable(t.ksn.counter));
            prop_assert_eq!(&t.key, &dukpt::host_transaction_key(&bdk, t.ksn).unwrap());
            let w = t.working_key(KeyUsage::PinEncryption, KeyType::Aes128).unwrap();
            prop_assert_eq!(w, dukpt::host_working_key(&bdk, t.ksn, KeyUsage::PinEncryption, KeyType::Aes128).unwrap());
        }
    }
}

#[test]
fn refusals() {
    let bdk128 = AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").unwrap();
    let ksn = Ksn::from_hex("123456789012345600000001").unwrap();
    assert!(
        dukpt::host_working_key(&bdk128, ksn, KeyUsage::PinEncryption, KeyType::Aes256).is_err()
    );
    assert!(AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1").is_err());
    assert!(AesKey::from_hex("not hex").is_err());
    assert!(Ksn::from_hex("1234567890123456000001").is_err());
    assert!("1234567".parse::<dukpt::BdkId>().is_err());
    assert_eq!(ksn.to_string(), "123456789012345600000001");
}
