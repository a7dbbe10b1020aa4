//! What a bench slot issues: the operation mix, key and value bytes, and the
//! seeded stream that makes a run repeat itself under the same `--seed`.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Distinct random values per thread; puts pick one of them.
pub(super) const VALUE_POOL_LEN: usize = 64;

/// An operation type of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpKind {
    /// Unconditional write.
    Put,
    /// Read at the chosen consistency.
    Get,
    /// Stale read of the version, then compare-and-swap at it.
    Cas,
}

impl OpKind {
    pub(super) const ALL: [OpKind; 3] = [OpKind::Put, OpKind::Get, OpKind::Cas];

    pub(super) fn name(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::Get => "get",
            OpKind::Cas => "cas",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Relative weights of put, get and cas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 3],
}

impl Mix {
    /// Parses `put=50,get=50,cas=0`. Names may be left out (weight 0), not
    /// repeated; at least one weight must be positive.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut weights = [0u32; 3];
        let mut seen = [false; 3];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').ok_or_else(|| {
                format!("`{part}` in --mix is not name=weight (e.g. put=50,get=50,cas=0)")
            })?;
            let name = name.trim();
            let kind = OpKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    format!("unknown operation `{name}` in --mix; use put, get or cas")
                })?;
            let weight: u32 = weight.trim().parse().map_err(|_| {
                format!(
                    "weight `{}` of {name} in --mix is not a whole number",
                    weight.trim()
                )
            })?;
            if seen[kind.index()] {
                return Err(format!("{name} appears twice in --mix"));
            }
            if weight > 1_000_000 {
                return Err(format!(
                    "weight {weight} of {name} in --mix is above 1000000"
                ));
            }
            seen[kind.index()] = true;
            weights[kind.index()] = weight;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err(format!(
                "--mix `{text}` has no operation with a positive weight"
            ));
        }
        Ok(Mix { weights })
    }

    pub(super) fn weight(&self, kind: OpKind) -> u32 {
        self.weights[kind.index()]
    }

    pub(super) fn total(&self) -> u32 {
        self.weights.iter().sum()
    }

    /// The operation for `roll` in `[0, total)`.
    pub(super) fn pick(&self, roll: u32) -> OpKind {
        let mut roll = roll;
        for kind in OpKind::ALL {
            let weight = self.weight(kind);
            if roll < weight {
                return kind;
            }
            roll -= weight;
        }
        panic!(
            "mix roll beyond the total weight {}: {:?}",
            self.total(),
            self
        );
    }

    pub(super) fn kinds(&self) -> impl Iterator<Item = OpKind> + '_ {
        OpKind::ALL.into_iter().filter(|k| self.weight(*k) > 0)
    }
}

/// As `--mix` takes it, every operation named: `put=50,get=50,cas=0`.
impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, kind) in OpKind::ALL.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(f, "{separator}{}={}", kind.name(), self.weight(*kind))?;
        }
        Ok(())
    }
}

/// `key_size` bytes naming key `index`: zero-padded decimal.
///
/// # Panics
///
/// If the decimal form of `index` is longer than `key_size`;
/// [`Settings::new`](super::settings::Settings::new) refuses such a keyspace.
pub(super) fn key_bytes(index: u64, key_size: usize) -> Bytes {
    // By hand: `format!` with padding writes the zeros one `write_char` at
    // a time, 1 % of a pipelined bench's CPU.
    let mut key = vec![b'0'; key_size];
    let mut rest = index;
    for digit in key.iter_mut().rev() {
        if rest == 0 {
            break;
        }
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    assert!(
        rest == 0,
        "key index {index} does not fit in {key_size} bytes"
    );
    Bytes::from(key)
}

/// Number of decimal digits of the largest index of a keyspace.
pub(super) fn digits_needed(keyspace: u64) -> usize {
    keyspace.saturating_sub(1).max(1).to_string().len()
}

/// SplitMix64: spreads consecutive slot numbers into unrelated seeds.
fn mix_seed(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One operation a slot is about to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PlannedOp {
    /// What to do.
    pub(super) kind: OpKind,
    /// Index of the key in the keyspace.
    pub(super) key_index: u64,
    /// Index of the value in the thread's value pool.
    pub(super) value_index: usize,
}

/// The deterministic operation stream of one slot.
pub(super) struct Workload {
    rng: StdRng,
    mix: Mix,
    keyspace: u64,
}

impl Workload {
    /// The stream of slot `slot` under `seed`.
    pub(super) fn new(seed: u64, slot: u64, mix: Mix, keyspace: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(mix_seed(seed ^ mix_seed(slot))),
            mix,
            keyspace,
        }
    }

    /// The next operation.
    pub(super) fn next_op(&mut self) -> PlannedOp {
        let kind = self.mix.pick(self.rng.gen_range(0..self.mix.total()));
        PlannedOp {
            kind,
            key_index: self.rng.gen_range(0..self.keyspace),
            value_index: self.rng.gen_range(0..VALUE_POOL_LEN),
        }
    }
}

/// Random values of `value_size` bytes, shared by the slots of one thread.
pub(super) fn value_pool(seed: u64, thread: usize, value_size: usize) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(mix_seed(!seed ^ mix_seed(thread as u64)));
    (0..VALUE_POOL_LEN)
        .map(|_| {
            let mut value = vec![0u8; value_size];
            rng.fill_bytes(&mut value);
            Bytes::from(value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_weights_and_leaves_missing_ops_at_zero() {
        let mix = Mix::parse("put=50,get=50,cas=0").unwrap();
        assert_eq!(mix.weights, [50, 50, 0]);
        let mix = Mix::parse(" get = 3 ").unwrap();
        assert_eq!(mix.weights, [0, 3, 0]);
        assert_eq!(mix.to_string(), "put=0,get=3,cas=0");
        assert_eq!(mix.kinds().collect::<Vec<_>>(), vec![OpKind::Get]);
    }

    #[test]
    fn mix_errors_name_the_problem() {
        let error = |text: &str| Mix::parse(text).unwrap_err();
        assert!(error("put").contains("not name=weight"), "{}", error("put"));
        assert!(error("del=5").contains("unknown operation `del`"));
        assert!(error("put=half").contains("not a whole number"));
        assert!(error("put=-1").contains("not a whole number"));
        assert!(error("put=1,put=2").contains("put appears twice"));
        assert!(error("put=0,get=0").contains("no operation with a positive weight"));
        assert!(error("").contains("no operation with a positive weight"));
        assert!(error("put=2000000").contains("above 1000000"));
    }

    #[test]
    fn mix_pick_follows_the_weights_exactly() {
        let mix = Mix::parse("put=2,get=3,cas=5").unwrap();
        let picks: Vec<OpKind> = (0..mix.total()).map(|roll| mix.pick(roll)).collect();
        let count = |k: OpKind| picks.iter().filter(|p| **p == k).count();
        assert_eq!(
            (count(OpKind::Put), count(OpKind::Get), count(OpKind::Cas)),
            (2, 3, 5)
        );
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_key_index_too_long_for_the_key_size_panics() {
        key_bytes(100, 2);
    }

    #[test]
    fn keys_are_fixed_size_zero_padded_indexes() {
        assert_eq!(&key_bytes(42, 16)[..], b"0000000000000042");
        assert_eq!(&key_bytes(99_999, 5)[..], b"99999");
        assert_eq!(&key_bytes(0, 3)[..], b"000");
        assert_eq!(
            &key_bytes(u64::MAX, 20)[..],
            u64::MAX.to_string().as_bytes()
        );
        for index in [1, 9, 10, 12_345, 1_000_000] {
            assert_eq!(key_bytes(index, 12), format!("{index:012}").as_bytes());
        }
        assert_eq!(digits_needed(100_000), 5);
        assert_eq!(digits_needed(1), 1);
        assert_eq!(digits_needed(10), 1);
        assert_eq!(digits_needed(11), 2);
    }

    #[test]
    fn workloads_are_deterministic_per_seed_and_slot() {
        let mix = Mix::parse("put=1,get=1,cas=1").unwrap();
        let ops = |seed, slot| {
            let mut w = Workload::new(seed, slot, mix, 1000);
            (0..200).map(|_| w.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(ops(7, 3), ops(7, 3));
        assert_ne!(ops(7, 3), ops(7, 4), "slots differ");
        assert_ne!(ops(7, 3), ops(8, 3), "seeds differ");
        for op in ops(7, 3) {
            assert!(op.key_index < 1000);
            assert!(op.value_index < VALUE_POOL_LEN);
        }
        let kinds: Vec<OpKind> = ops(7, 3).iter().map(|o| o.kind).collect();
        for kind in OpKind::ALL {
            assert!(kinds.contains(&kind), "{kind:?} never drawn");
        }
        let puts_only = Mix::parse("put=1").unwrap();
        let mut w = Workload::new(1, 1, puts_only, 10);
        assert!((0..100).all(|_| w.next_op().kind == OpKind::Put));
    }

    #[test]
    fn value_pool_is_deterministic_and_sized() {
        let pool = value_pool(5, 0, 256);
        assert_eq!(pool.len(), VALUE_POOL_LEN);
        assert!(pool.iter().all(|v| v.len() == 256));
        assert_eq!(pool, value_pool(5, 0, 256));
        assert_ne!(pool, value_pool(5, 1, 256));
    }
}
