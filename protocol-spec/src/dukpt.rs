//! AES DUKPT (Derived Unique Key Per Transaction), ANSI X9.24-3-2017, for AES-128 and AES-256
//! base derivation keys. Pure: no storage, no clock, no randomness.
//!
//! - A Base Derivation Key ([`Bdk`]) and an Initial Key ID ([`InitialKeyId`]: BDK id, 4 octets,
//!   then derivation id, 4 octets) give the device's Initial Key ([`initial_key`]).
//! - A Key Serial Number ([`Ksn`]) is the Initial Key ID and a 32-bit transaction counter.
//! - The host derives a transaction's keys straight from the BDK and the KSN
//!   ([`host_transaction_key`], [`host_working_key`]); the device derives the same keys from its
//!   Initial Key with the standard's intermediate derivation key register, one transaction
//!   after the other ([`DukptDevice`]), never holding the Initial Key after loading it.
//! - Every derivation is AES-ECB under the derivation key over 16-octet derivation data blocks
//!   (X9.24-3-2017 section 6.3.2): version `01`, key block counter, key usage indicator (2
//!   octets), algorithm indicator (2 octets), length of the derived key in bits (2 octets), and 8
//!   octets of context: the whole Initial Key ID for the Initial Key, otherwise the derivation id
//!   (the Initial Key ID's rightmost 4 octets) and a transaction counter. An AES-256 key takes two
//!   blocks, with key block counters 1 and 2.
//! - The key check value of an AES key is AES-CMAC (NIST SP 800-38B) over one block of zeros,
//!   leftmost 40 bits ([`kcv`]): ANSI X9.24-1-2017, which requires the CMAC method for AES keys
//!   (the "encrypt a block of zeros" method is for TDEA only) and allows at most 40 bits.
//!
//! The device may only use counters with at most 16 one bits (X9.24-3-2017: a device "shall not"
//! use a transaction counter with more than 16 one bits); after such a counter it skips ahead,
//! e.g. from 0x1FFFE to 0x20000.

use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The largest number of one bits a usable transaction counter has (X9.24-3-2017).
pub const MAX_COUNTER_ONE_BITS: u32 = 16;

/// Number of intermediate derivation key registers: one per counter bit.
const REGISTERS: usize = 32;

/// The AES key types this module derives and holds (X9.24-3-2017 algorithm indicators
/// `0002` and `0004`; AES-192 and the TDEA working keys the standard also defines are left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    Aes128,
    Aes256,
}

impl KeyType {
    /// The key length in octets.
    pub fn key_len(self) -> usize {
        match self {
            KeyType::Aes128 => 16,
            KeyType::Aes256 => 32,
        }
    }

    /// The key type of a key of `len` octets.
    pub fn from_len(len: usize) -> Option<KeyType> {
        match len {
            16 => Some(KeyType::Aes128),
            32 => Some(KeyType::Aes256),
            _ => None,
        }
    }

    /// The name the CLI, the store and the wire use: `aes-128` or `aes-256`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Aes128 => "aes-128",
            KeyType::Aes256 => "aes-256",
        }
    }

    /// The secret-delivery algorithm of an Initial Key of this type: `aes-128-dukpt` or
    /// `aes-256-dukpt`.
    pub fn dukpt_algorithm(self) -> &'static str {
        match self {
            KeyType::Aes128 => "aes-128-dukpt",
            KeyType::Aes256 => "aes-256-dukpt",
        }
    }

    /// The key type named by [`KeyType::name`] or [`KeyType::dukpt_algorithm`].
    pub fn from_name(s: &str) -> Option<KeyType> {
        match s {
            "aes-128" | "aes128" | "aes-128-dukpt" => Some(KeyType::Aes128),
            "aes-256" | "aes256" | "aes-256-dukpt" => Some(KeyType::Aes256),
            _ => None,
        }
    }

    /// The derivation data's algorithm indicator (X9.24-3-2017 section 6.3.2).
    fn indicator(self) -> u16 {
        match self {
            KeyType::Aes128 => 0x0002,
            KeyType::Aes256 => 0x0004,
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a working key is for: the derivation data's key usage indicator (X9.24-3-2017
/// section 6.3.2). The two derivation usages (`8000`, `8001`) are internal to this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyUsage {
    KeyEncryptionKey,
    PinEncryption,
    MacGeneration,
    MacVerification,
    MacBothWays,
    DataEncryptionEncrypt,
    DataEncryptionDecrypt,
    DataEncryptionBothWays,
}

impl KeyUsage {
    /// Every usage, in indicator order.
    pub const ALL: [KeyUsage; 8] = [
        KeyUsage::KeyEncryptionKey,
        KeyUsage::PinEncryption,
        KeyUsage::MacGeneration,
        KeyUsage::MacVerification,
        KeyUsage::MacBothWays,
        KeyUsage::DataEncryptionEncrypt,
        KeyUsage::DataEncryptionDecrypt,
        KeyUsage::DataEncryptionBothWays,
    ];

    /// The key usage indicator.
    pub fn indicator(self) -> u16 {
        match self {
            KeyUsage::KeyEncryptionKey => 0x0002,
            KeyUsage::PinEncryption => 0x1000,
            KeyUsage::MacGeneration => 0x2000,
            KeyUsage::MacVerification => 0x2001,
            KeyUsage::MacBothWays => 0x2002,
            KeyUsage::DataEncryptionEncrypt => 0x3000,
            KeyUsage::DataEncryptionDecrypt => 0x3001,
            KeyUsage::DataEncryptionBothWays => 0x3002,
        }
    }

    /// The name the command lines use.
    pub fn name(self) -> &'static str {
        match self {
            KeyUsage::KeyEncryptionKey => "key-encryption",
            KeyUsage::PinEncryption => "pin-encryption",
            KeyUsage::MacGeneration => "mac-generation",
            KeyUsage::MacVerification => "mac-verification",
            KeyUsage::MacBothWays => "mac-both-ways",
            KeyUsage::DataEncryptionEncrypt => "data-encrypt",
            KeyUsage::DataEncryptionDecrypt => "data-decrypt",
            KeyUsage::DataEncryptionBothWays => "data-both-ways",
        }
    }
}

impl std::str::FromStr for KeyUsage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyUsage::ALL
            .into_iter()
            .find(|u| u.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = KeyUsage::ALL.iter().map(|u| u.name()).collect();
                format!("unknown key usage {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Key usage indicator `8000`: an intermediate derivation key.
const USAGE_KEY_DERIVATION: u16 = 0x8000;
/// Key usage indicator `8001`: the Initial Key.
const USAGE_INITIAL_KEY: u16 = 0x8001;

/// An AES key of a [`KeyType`], wiped from memory when dropped. Its `Debug` shows the type and
/// the key check value, never the key.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct AesKey {
    #[zeroize(skip)]
    key_type: KeyType,
    bytes: Vec<u8>,
}

impl AesKey {
    /// A key from its octets: 16 (AES-128) or 32 (AES-256); any other length is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<AesKey, DukptError> {
        let key_type = KeyType::from_len(bytes.len()).ok_or(DukptError::KeyLength(bytes.len()))?;
        Ok(AesKey {
            key_type,
            bytes: bytes.to_vec(),
        })
    }

    /// A key from hex digits (32 or 64, either case, surrounding white space ignored).
    pub fn from_hex(s: &str) -> Result<AesKey, DukptError> {
        let mut bytes = hex::decode(s.trim()).map_err(|_| DukptError::KeyHex)?;
        let key = AesKey::from_bytes(&bytes);
        bytes.zeroize();
        key
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The key's octets. Callers that copy them own wiping the copy.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// The key check value: see [`kcv`].
    pub fn kcv(&self) -> [u8; KCV_LEN] {
        kcv(self)
    }

    /// AES-ECB encryption of one block under this key.
    fn encrypt_block(&self, block: [u8; 16]) -> [u8; 16] {
        let mut b = GenericArray::from(block);
        match self.key_type {
            // The lengths match by construction (`from_bytes` and `derive` check them), so
            // `new_from_slice` cannot fail; an impossible failure leaves the block unencrypted
            // only in the sense that the (never produced) result would be wrong, so map it
            // to an all-zero output rather than panic.
            KeyType::Aes128 => match aes::Aes128::new_from_slice(&self.bytes) {
                Ok(c) => c.encrypt_block(&mut b),
                Err(_) => return [0; 16],
            },
            KeyType::Aes256 => match aes::Aes256::new_from_slice(&self.bytes) {
                Ok(c) => c.encrypt_block(&mut b),
                Err(_) => return [0; 16],
            },
        }
        b.into()
    }
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AesKey")
            .field("key_type", &self.key_type)
            .field("kcv", &hex::encode(self.kcv()))
            .finish_non_exhaustive()
    }
}

/// A Base Derivation Key: an AES-128 or AES-256 key from which Initial Keys are derived.
pub type Bdk = AesKey;

/// Length of a key check value in octets: 40 bits, the most X9.24-1-2017 allows.
pub const KCV_LEN: usize = 5;

/// Key check value of an AES key (ANSI X9.24-1-2017, as PCI PIN requirement 15-1 repeats it):
/// "the KCV is calculated by MACing an all binary zeros block using the CMAC algorithm", the
/// leftmost 40 bits; "AES must only use the CMAC method". CMAC is NIST SP 800-38B: for one
/// complete block M, MAC = AES(K, M xor K1) with K1 = dbl(AES(K, 0^128)).
pub fn kcv(key: &AesKey) -> [u8; KCV_LEN] {
    match kcv_with(|block| Ok::<_, std::convert::Infallible>(key.encrypt_block(block))) {
        Ok(kcv) => kcv,
        Err(never) => match never {},
    }
}

/// [`kcv`] of a key held elsewhere (a BDK in a hardware token): `encrypt` is AES-ECB of one
/// block under that key; it is called twice (the CMAC subkey's block, then the MAC's).
pub fn kcv_with<E>(
    mut encrypt: impl FnMut([u8; 16]) -> Result<[u8; 16], E>,
) -> Result<[u8; KCV_LEN], E> {
    let l = encrypt([0; 16])?;
    // Subkey K1 (SP 800-38B section 6.1): L shifted left one bit, xor Rb = 0x87 if the
    // shifted-out bit was one. The message is one zero block, so M xor K1 = K1.
    let mut k1 = [0u8; 16];
    for i in 0..16 {
        let next = if i + 1 < 16 { l[i + 1] >> 7 } else { 0 };
        k1[i] = (l[i] << 1) | next;
    }
    if l[0] & 0x80 != 0 {
        k1[15] ^= 0x87;
    }
    let mac = encrypt(k1)?;
    let mut out = [0u8; KCV_LEN];
    out.copy_from_slice(&mac[..KCV_LEN]);
    Ok(out)
}

/// An Initial Key ID: BDK id (4 octets) || derivation id (4 octets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitialKeyId([u8; 8]);

impl InitialKeyId {
    /// The Initial Key ID of a BDK id and a derivation id.
    pub fn new(bdk_id: BdkId, derivation_id: u32) -> InitialKeyId {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&bdk_id.0);
        b[4..].copy_from_slice(&derivation_id.to_be_bytes());
        InitialKeyId(b)
    }

    /// From its 8 octets.
    pub fn from_bytes(b: [u8; 8]) -> InitialKeyId {
        InitialKeyId(b)
    }

    /// From 16 hex digits.
    pub fn from_hex(s: &str) -> Result<InitialKeyId, DukptError> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s.trim(), &mut b).map_err(|_| DukptError::InitialKeyIdHex)?;
        Ok(InitialKeyId(b))
    }

    /// The 8 octets.
    pub fn bytes(&self) -> [u8; 8] {
        self.0
    }

    /// The BDK id: the leftmost 4 octets.
    pub fn bdk_id(&self) -> BdkId {
        BdkId([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The derivation id: the rightmost 4 octets.
    pub fn derivation_id(&self) -> u32 {
        u32::from_be_bytes([self.0[4], self.0[5], self.0[6], self.0[7]])
    }
}

impl std::fmt::Display for InitialKeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

/// A BDK id: the 4 octets that start every Initial Key ID derived from that BDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BdkId([u8; 4]);

impl BdkId {
    /// From its 4 octets.
    pub fn from_bytes(b: [u8; 4]) -> BdkId {
        BdkId(b)
    }

    /// The 4 octets.
    pub fn bytes(&self) -> [u8; 4] {
        self.0
    }
}

impl std::str::FromStr for BdkId {
    type Err = DukptError;

    /// Exactly 8 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 4];
        hex::decode_to_slice(s, &mut b).map_err(|_| DukptError::BdkIdHex(s.to_string()))?;
        Ok(BdkId(b))
    }
}

impl std::fmt::Display for BdkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

/// A Key Serial Number: the Initial Key ID and a transaction counter, 12 octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ksn {
    pub initial_key_id: InitialKeyId,
    pub counter: u32,
}

impl Ksn {
    /// The 12 octets.
    pub fn bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&self.initial_key_id.0);
        b[8..].copy_from_slice(&self.counter.to_be_bytes());
        b
    }

    /// From 24 hex digits.
    pub fn from_hex(s: &str) -> Result<Ksn, DukptError> {
        let mut b = [0u8; 12];
        hex::decode_to_slice(s.trim(), &mut b).map_err(|_| DukptError::KsnHex)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        Ok(Ksn {
            initial_key_id: InitialKeyId(id),
            counter: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

impl std::fmt::Display for Ksn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode_upper(self.bytes()))
    }
}

/// Why a DUKPT value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DukptError {
    #[error("an AES DUKPT key is 16 octets (AES-128) or 32 octets (AES-256), not {0}")]
    KeyLength(usize),
    #[error("a key must be 32 or 64 hex digits")]
    KeyHex,
    #[error("a BDK id is 8 hex digits, not {0:?}")]
    BdkIdHex(String),
    #[error("an Initial Key ID is 16 hex digits")]
    InitialKeyIdHex,
    #[error("a KSN is 24 hex digits (Initial Key ID, then the transaction counter)")]
    KsnHex,
    #[error(
        "transaction counter {0:#x} is not usable: it must be from 1 and have at most 16 one bits"
    )]
    CounterNotUsable(u32),
    #[error("a {wanted} working key cannot be derived from a {from} key: it would be stronger")]
    WorkingKeyTooStrong { wanted: KeyType, from: KeyType },
    #[error("the device has used every transaction counter")]
    Exhausted,
    #[error("the KSN's Initial Key ID {ksn} is not this device's {device}")]
    WrongInitialKeyId {
        ksn: InitialKeyId,
        device: InitialKeyId,
    },
}

/// The Initial Key of `initial_key_id` under `bdk` (X9.24-3-2017 section 6.3.1, "Derive
/// Initial Key"): same key type as the BDK, key usage `8001`, the whole Initial Key ID as
/// context.
pub fn initial_key(bdk: &Bdk, initial_key_id: InitialKeyId) -> AesKey {
    derive(bdk, USAGE_INITIAL_KEY, bdk.key_type, initial_key_id.0)
}

/// [`initial_key`] under a BDK of `key_type` held elsewhere (a hardware token, which never
/// lets the BDK out): `encrypt` is AES-ECB of one block under the BDK, called once per
/// derivation data block (twice for AES-256), in order. The Initial Key it returns is computed
/// here, as [`initial_key`] computes it.
pub fn initial_key_with<E>(
    key_type: KeyType,
    initial_key_id: InitialKeyId,
    encrypt: impl FnMut([u8; 16]) -> Result<[u8; 16], E>,
) -> Result<AesKey, E> {
    derive_with(USAGE_INITIAL_KEY, key_type, initial_key_id.0, encrypt)
}

/// Whether a device may use `counter`: from 1, at most 16 one bits.
pub fn counter_usable(counter: u32) -> bool {
    counter != 0 && counter.count_ones() <= MAX_COUNTER_ONE_BITS
}

/// The transaction's derivation key for `ksn` from the Initial Key (the host algorithm of
/// X9.24-3-2017 section 6.4: walk the counter's one bits from the most significant, each step
/// deriving with key usage `8000` and the counter prefix so far). Every working key of the
/// transaction is derived from it.
pub fn transaction_key(initial_key: &AesKey, ksn: Ksn) -> Result<AesKey, DukptError> {
    if !counter_usable(ksn.counter) {
        return Err(DukptError::CounterNotUsable(ksn.counter));
    }
    let derivation_id = ksn.initial_key_id.derivation_id();
    let mut key = initial_key.clone();
    let mut prefix = 0u32;
    for bit in (0..32).rev() {
        let mask = 1u32 << bit;
        if ksn.counter & mask != 0 {
            prefix |= mask;
            key = derive(
                &key,
                USAGE_KEY_DERIVATION,
                key.key_type,
                context(derivation_id, prefix),
            );
        }
    }
    Ok(key)
}

/// The host side: the transaction's derivation key straight from the BDK and the KSN.
pub fn host_transaction_key(bdk: &Bdk, ksn: Ksn) -> Result<AesKey, DukptError> {
    transaction_key(&initial_key(bdk, ksn.initial_key_id), ksn)
}

/// The host side: a working key of the transaction `ksn` straight from the BDK.
pub fn host_working_key(
    bdk: &Bdk,
    ksn: Ksn,
    usage: KeyUsage,
    key_type: KeyType,
) -> Result<AesKey, DukptError> {
    working_key(&host_transaction_key(bdk, ksn)?, ksn, usage, key_type)
}

/// A working key from a transaction's derivation key (X9.24-3-2017 "Derive Working Key"): key
/// usage and type of the working key, the derivation id and the transaction counter as context.
/// A working key is never stronger than the key it comes from.
pub fn working_key(
    transaction_key: &AesKey,
    ksn: Ksn,
    usage: KeyUsage,
    key_type: KeyType,
) -> Result<AesKey, DukptError> {
    if key_type.key_len() > transaction_key.key_type.key_len() {
        return Err(DukptError::WorkingKeyTooStrong {
            wanted: key_type,
            from: transaction_key.key_type,
        });
    }
    Ok(derive(
        transaction_key,
        usage.indicator(),
        key_type,
        context(ksn.initial_key_id.derivation_id(), ksn.counter),
    ))
}

/// The device side (X9.24-3-2017 section 6.5, the transaction-originating device): the
/// intermediate derivation key register, one future key per counter bit, and the next
/// transaction counter. Loading derives the 32 future keys from the Initial Key and drops it;
/// each transaction takes its key from the register of its counter's lowest one bit, fills the
/// registers below that bit with the keys of the counters to come (unless the counter already
/// has 16 one bits), and erases the used register.
#[derive(Clone)]
pub struct DukptDevice {
    initial_key_id: InitialKeyId,
    key_type: KeyType,
    registers: Vec<Option<AesKey>>,
    /// The counter of the next transaction; `None` once every counter is used.
    next: Option<u32>,
}

/// One transaction on the device: its KSN and its derivation key.
#[derive(Debug, Clone)]
pub struct DeviceTransaction {
    pub ksn: Ksn,
    pub key: AesKey,
}

impl DeviceTransaction {
    /// A working key of this transaction.
    pub fn working_key(&self, usage: KeyUsage, key_type: KeyType) -> Result<AesKey, DukptError> {
        working_key(&self.key, self.ksn, usage, key_type)
    }
}

impl DukptDevice {
    /// Load an Initial Key ("Load Initial Key"): derive the future key of every counter with a
    /// single one bit; the next transaction is counter 1.
    pub fn load(initial_key: &AesKey, initial_key_id: InitialKeyId) -> DukptDevice {
        let mut device = DukptDevice {
            initial_key_id,
            key_type: initial_key.key_type,
            registers: vec![None; REGISTERS],
            next: Some(1),
        };
        device.fill_registers_below(REGISTERS, initial_key, 0);
        device
    }

    /// The device as it would be after loading `initial_key` and using every usable counter
    /// below `counter`, without stepping through them: each register holds the key the
    /// standard's device would hold there (the key of `counter` with its bits at and below
    /// that register's cleared, plus that register's bit, for each bit at or above the
    /// counter's lowest one bit that the counter does not have, and the counter's own key at
    /// its lowest one bit).
    pub fn resume(
        initial_key: &AesKey,
        initial_key_id: InitialKeyId,
        counter: u32,
    ) -> Result<DukptDevice, DukptError> {
        if !counter_usable(counter) {
            return Err(DukptError::CounterNotUsable(counter));
        }
        let mut device = DukptDevice {
            initial_key_id,
            key_type: initial_key.key_type,
            registers: vec![None; REGISTERS],
            next: Some(counter),
        };
        let lowest = counter.trailing_zeros() as usize;
        for bit in lowest..REGISTERS {
            let mask = 1u32 << bit;
            let upper = if bit == 31 {
                0
            } else {
                counter & !((mask << 1) - 1)
            };
            let wanted = upper | mask;
            // The register of a bit the counter has (other than its lowest) was used and
            // erased; a future key whose counter has too many one bits is never derived.
            let used = bit != lowest && counter & mask != 0;
            if used || !counter_usable(wanted) {
                continue;
            }
            let ksn = Ksn {
                initial_key_id,
                counter: wanted,
            };
            device.registers[bit] = Some(transaction_key(initial_key, ksn)?);
        }
        Ok(device)
    }

    /// The Initial Key ID.
    pub fn initial_key_id(&self) -> InitialKeyId {
        self.initial_key_id
    }

    /// The key type of the Initial Key and of every derivation key.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The KSN of the next transaction, or `None` once the device is exhausted.
    pub fn next_ksn(&self) -> Option<Ksn> {
        self.next.map(|counter| Ksn {
            initial_key_id: self.initial_key_id,
            counter,
        })
    }

    /// Run the next transaction: its KSN and key; the register moves on to the next usable
    /// counter.
    pub fn next_transaction(&mut self) -> Result<DeviceTransaction, DukptError> {
        let counter = self.next.ok_or(DukptError::Exhausted)?;
        let bit = counter.trailing_zeros() as usize;
        // The register of the counter's lowest one bit holds its key; the invariant above
        // (load, resume and every step keep it) makes it present.
        let key = self
            .registers
            .get_mut(bit)
            .and_then(Option::take)
            .ok_or(DukptError::Exhausted)?;
        let ksn = Ksn {
            initial_key_id: self.initial_key_id,
            counter,
        };
        if counter.count_ones() < MAX_COUNTER_ONE_BITS {
            // Future keys for the counters this one's prefix leads to.
            self.fill_registers_below(bit, &key, counter);
            self.next = counter.checked_add(1);
        } else {
            // 16 one bits: the counters below this one's lowest bit would have 17; skip them.
            self.next = counter.checked_add(1 << bit);
        }
        Ok(DeviceTransaction { ksn, key })
    }

    /// Registers `0..below` get the keys of `base_counter | 1 << i`, derived from `base`.
    fn fill_registers_below(&mut self, below: usize, base: &AesKey, base_counter: u32) {
        let derivation_id = self.initial_key_id.derivation_id();
        for (i, register) in self.registers.iter_mut().enumerate().take(below) {
            let counter = base_counter | (1u32 << i);
            *register = Some(derive(
                base,
                USAGE_KEY_DERIVATION,
                self.key_type,
                context(derivation_id, counter),
            ));
        }
    }
}

impl std::fmt::Debug for DukptDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DukptDevice")
            .field("initial_key_id", &self.initial_key_id)
            .field("key_type", &self.key_type)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// The 8 octets of context of every derivation but the Initial Key's.
fn context(derivation_id: u32, counter: u32) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..4].copy_from_slice(&derivation_id.to_be_bytes());
    c[4..].copy_from_slice(&counter.to_be_bytes());
    c
}

/// One derivation (X9.24-3-2017 section 6.3.2, "Derive Key"): AES-ECB under `key` of as many
/// derivation data blocks as the derived key needs.
fn derive(key: &AesKey, usage: u16, key_type: KeyType, context: [u8; 8]) -> AesKey {
    match derive_with(usage, key_type, context, |block| {
        Ok::<_, std::convert::Infallible>(key.encrypt_block(block))
    }) {
        Ok(derived) => derived,
        Err(never) => match never {},
    }
}

/// [`derive`] with the deriving key's AES-ECB given as `encrypt`, one block at a time.
fn derive_with<E>(
    usage: u16,
    key_type: KeyType,
    context: [u8; 8],
    mut encrypt: impl FnMut([u8; 16]) -> Result<[u8; 16], E>,
) -> Result<AesKey, E> {
    let blocks = key_type.key_len() / 16;
    let mut bytes = Vec::with_capacity(key_type.key_len());
    for block_counter in 1..=blocks {
        let mut data = [0u8; 16];
        data[0] = 0x01; // version
        data[1] = block_counter as u8; // 1 or 2
        data[2..4].copy_from_slice(&usage.to_be_bytes());
        data[4..6].copy_from_slice(&key_type.indicator().to_be_bytes());
        data[6..8].copy_from_slice(&((key_type.key_len() * 8) as u16).to_be_bytes());
        data[8..].copy_from_slice(&context);
        let mut block = encrypt(data)?;
        bytes.extend_from_slice(&block);
        block.zeroize();
    }
    Ok(AesKey { key_type, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdk128() -> Bdk {
        AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").unwrap()
    }

    #[test]
    fn the_published_initial_key() {
        let id = InitialKeyId::from_hex("1234567890123456").unwrap();
        assert_eq!(
            hex::encode_upper(initial_key(&bdk128(), id).expose()),
            "1273671EA26AC29AFA4D1084127652A1"
        );
        assert_eq!(id.bdk_id().to_string(), "12345678");
        assert_eq!(id.derivation_id(), 0x9012_3456);
    }

    #[test]
    fn kcv_is_cmac_of_a_zero_block() {
        // The RFC 4493 section 4 key: AES-128(key, 0^128) = 7df76b0c1ab899b33e42f047b91b546f
        // gives the subkey K1 = fbeed618357133667c85e08f7236a8de (RFC 4493 section 4); the
        // CMAC of one zero block is AES-128(key, K1), of which the KCV keeps 5 octets.
        let key = AesKey::from_hex("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        assert_eq!(
            hex::encode(key.encrypt_block([0; 16])),
            "7df76b0c1ab899b33e42f047b91b546f"
        );
        let k1: [u8; 16] = hex::decode("fbeed618357133667c85e08f7236a8de")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(kcv(&key)[..], key.encrypt_block(k1)[..5]);
        assert_eq!(hex::encode_upper(kcv(&key)), "7AD386C376");
    }

    #[test]
    fn a_bdk_held_elsewhere_gives_the_same_initial_key_and_kcv() {
        let id = InitialKeyId::from_hex("1234567890123456").unwrap();
        for bdk in [
            bdk128(),
            AesKey::from_hex(&"FEDCBA9876543210F1F1F1F1F1F1F1F1".repeat(2)).unwrap(),
        ] {
            let mut calls = 0;
            let ik = initial_key_with(bdk.key_type(), id, |b| {
                calls += 1;
                Ok::<_, ()>(bdk.encrypt_block(b))
            })
            .unwrap();
            assert_eq!(ik, initial_key(&bdk, id));
            assert_eq!(calls, bdk.key_type().key_len() / 16);
            let kcv = kcv_with(|b| Ok::<_, ()>(bdk.encrypt_block(b))).unwrap();
            assert_eq!(kcv, bdk.kcv());
        }
        // A failure of the holder is passed on, not turned into a key.
        assert_eq!(
            initial_key_with(KeyType::Aes128, id, |_| Err::<[u8; 16], _>("gone")),
            Err("gone")
        );
    }

    #[test]
    fn key_lengths_other_than_16_and_32_are_refused() {
        for len in [0, 8, 15, 17, 24, 31, 33, 64] {
            assert_eq!(
                AesKey::from_bytes(&vec![1; len]),
                Err(DukptError::KeyLength(len))
            );
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = format!("{:?}", bdk128());
        assert!(!s.to_lowercase().contains("fedcba"), "{s}");
    }

    #[test]
    fn device_and_host_agree_across_the_first_counters() {
        let id = InitialKeyId::from_hex("1234567890123456").unwrap();
        let ik = initial_key(&bdk128(), id);
        let mut device = DukptDevice::load(&ik, id);
        for _ in 0..300 {
            let t = device.next_transaction().unwrap();
            assert_eq!(t.key, host_transaction_key(&bdk128(), t.ksn).unwrap());
        }
    }

    #[test]
    fn unusable_counters_are_refused() {
        let ksn = Ksn::from_hex("12345678901234560001FFFF").unwrap();
        assert_eq!(
            host_transaction_key(&bdk128(), ksn),
            Err(DukptError::CounterNotUsable(0x1FFFF))
        );
        let ksn = Ksn::from_hex("123456789012345600000000").unwrap();
        assert!(host_transaction_key(&bdk128(), ksn).is_err());
    }
}
