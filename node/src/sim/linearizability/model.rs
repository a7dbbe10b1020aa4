//! The register model of one key: its states, and what each operation,
//! answered or not, does to them.

use std::collections::BTreeMap;

/// What is known of the version of the value in the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Version {
    /// Seen in an answer.
    Exact(u64),
    /// Written by a write without an answer and not seen yet: above this.
    Above(u64),
}

/// The state of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Register {
    /// No value; version 0.
    Absent,
    /// The value of `write` (its history index).
    Present { write: u32, version: Version },
    /// Whatever the operations before a window left, not pinned down yet
    /// (only its version, when an answer named it; 0 is Absent).
    Before { version: Option<u64> },
}

impl Register {
    /// A version every next write must exceed. Permissive for an unseen
    /// version (the true one is higher), which can only accept more.
    pub(super) fn floor(self) -> u64 {
        match self {
            Register::Absent | Register::Before { version: None } => 0,
            Register::Present {
                version: Version::Exact(version) | Version::Above(version),
                ..
            }
            | Register::Before {
                version: Some(version),
            } => version,
        }
    }

    /// Whether the key holds a value; None when not known.
    pub(super) fn presence(self) -> Option<bool> {
        match self {
            Register::Absent => Some(false),
            Register::Present { .. } | Register::Before { version: Some(_) } => Some(true),
            Register::Before { version: None } => None,
        }
    }

    /// Everything that can follow `other` can follow `self` too.
    pub(super) fn admits_all_of(self, other: Register) -> bool {
        match (self, other) {
            (
                Register::Present {
                    write,
                    version: Version::Above(floor),
                },
                Register::Present {
                    write: other_write,
                    version: Version::Above(other_floor),
                },
            ) => write == other_write && floor <= other_floor,
            _ => self == other,
        }
    }

    /// The register if its version can be `version`, now known to be it.
    pub(super) fn with_version(self, version: u64, model: &Model) -> Option<Register> {
        match self {
            Register::Absent => (version == 0).then_some(self),
            Register::Before { version: None } if version == 0 => Some(Register::Absent),
            Register::Before { version: None } => Some(Register::Before {
                version: Some(version),
            }),
            Register::Before {
                version: Some(known),
            } => (known == version).then_some(self),
            Register::Present {
                version: Version::Exact(exact),
                ..
            } => (exact == version).then_some(self),
            Register::Present {
                write,
                version: Version::Above(floor),
            } => (version > floor && model.claims.allows(version, write)).then_some(
                Register::Present {
                    write,
                    version: Version::Exact(version),
                },
            ),
        }
    }
}

/// The write that owns each version seen in the history. An unseen version
/// cannot turn out to be one another write owns.
#[derive(Debug, Default)]
pub(super) struct Claims(pub(super) BTreeMap<u64, u32>);

impl Claims {
    pub(super) fn allows(&self, version: u64, write: u32) -> bool {
        self.0.get(&version).is_none_or(|owner| *owner == write)
    }
}

/// What the model knows besides the register.
#[derive(Clone, Copy)]
pub(super) struct Model<'a> {
    pub(super) claims: &'a Claims,
    /// The history index of a window's first operation: writes below it may
    /// have written what the register holds when the window starts.
    pub(super) before: u32,
}

/// One operation as the model sees it; `None` results are unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Put {
        write: u32,
        version: Option<u64>,
    },
    Cas {
        write: u32,
        expected: u64,
        result: Option<CasResult>,
    },
    Delete {
        expected: Option<u64>,
        result: Option<DeleteResult>,
    },
    Get(Read),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CasResult {
    Written(u64),
    Mismatch(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DeleteResult {
    Deleted { found: bool },
    Mismatch(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Read {
    Found { write: u32, version: u64 },
    NotFound,
}

impl Action {
    /// The register after this operation takes effect in `state`, or None
    /// if its answer rules that out. An operation without an answer is only
    /// allowed where it changes the register: taking no effect is the same
    /// as never being placed, which the search allows anyway.
    pub(super) fn step(self, state: Register, model: &Model) -> Option<Register> {
        let written = |write, version| Register::Present { write, version };
        match self {
            Action::Put {
                write,
                version: Some(version),
            } => (version > state.floor()).then_some(written(write, Version::Exact(version))),
            Action::Put {
                write,
                version: None,
            } => Some(written(write, Version::Above(state.floor()))),
            Action::Cas {
                write,
                expected,
                result: Some(CasResult::Written(version)),
            } => {
                state.with_version(expected, model)?;
                (version > expected).then_some(written(write, Version::Exact(version)))
            }
            Action::Cas {
                expected,
                result: Some(CasResult::Mismatch(current)),
                ..
            }
            | Action::Delete {
                expected: Some(expected),
                result: Some(DeleteResult::Mismatch(current)),
            } => {
                if current == expected {
                    return None;
                }
                state.with_version(current, model)
            }
            Action::Cas {
                write,
                expected,
                result: None,
            } => {
                state.with_version(expected, model)?;
                Some(written(write, Version::Above(expected)))
            }
            Action::Delete {
                expected: None,
                result: Some(DeleteResult::Mismatch(_)),
            } => None,
            Action::Delete { expected, result } => {
                let state = match expected {
                    Some(expected) => state.with_version(expected, model)?,
                    None => state,
                };
                let presence = state.presence();
                match result {
                    Some(DeleteResult::Deleted { found }) => presence
                        .is_none_or(|present| present == found)
                        .then_some(Register::Absent),
                    None => presence.unwrap_or(true).then_some(Register::Absent),
                    Some(DeleteResult::Mismatch(_)) => unreachable!("matched above"),
                }
            }
            Action::Get(Read::Found { write, version }) => match state {
                Register::Present { write: held, .. } if held == write => {
                    state.with_version(version, model)
                }
                Register::Before { version: known }
                    if write < model.before
                        && version != 0
                        && known.is_none_or(|known| known == version)
                        && model.claims.allows(version, write) =>
                {
                    Some(written(write, Version::Exact(version)))
                }
                _ => None,
            },
            Action::Get(Read::NotFound) => {
                matches!(state, Register::Absent | Register::Before { version: None })
                    .then_some(Register::Absent)
            }
        }
    }

    /// Answered, and never changes the register (it may only learn its
    /// version).
    pub(super) fn is_read_only(self) -> bool {
        matches!(
            self,
            Action::Get(_)
                | Action::Cas {
                    result: Some(CasResult::Mismatch(_)),
                    ..
                }
                | Action::Delete {
                    result: Some(
                        DeleteResult::Mismatch(_) | DeleteResult::Deleted { found: false }
                    ),
                    ..
                }
        )
    }

    /// Answered and certainly changed the register.
    pub(super) fn is_definite_effect(self) -> bool {
        matches!(
            self,
            Action::Put {
                version: Some(_),
                ..
            } | Action::Cas {
                result: Some(CasResult::Written(_)),
                ..
            } | Action::Delete {
                result: Some(DeleteResult::Deleted { found: true }),
                ..
            }
        )
    }

    /// The same operation with its answer forgotten; None when it then
    /// could as well never have happened.
    pub(super) fn without_answer(self) -> Option<Action> {
        if self.is_read_only() {
            return None;
        }
        Some(match self {
            Action::Put { write, .. } => Action::Put {
                write,
                version: None,
            },
            Action::Cas {
                write, expected, ..
            } => Action::Cas {
                write,
                expected,
                result: None,
            },
            Action::Delete { expected, .. } => Action::Delete {
                expected,
                result: None,
            },
            Action::Get(_) => unreachable!("reads are read-only"),
        })
    }

    /// For a Put or Cas that wrote or may have: the write and its version
    /// if answered.
    pub(super) fn write(self) -> Option<(u32, Option<u64>)> {
        match self {
            Action::Put { write, version } => Some((write, version)),
            Action::Cas {
                write,
                result: None,
                ..
            } => Some((write, None)),
            Action::Cas {
                write,
                result: Some(CasResult::Written(version)),
                ..
            } => Some((write, Some(version))),
            Action::Cas {
                result: Some(CasResult::Mismatch(_)),
                ..
            }
            | Action::Delete { .. }
            | Action::Get(_) => None,
        }
    }

    /// The version the register must have had for the operation's answer:
    /// the current version a mismatch reports, or the expected version of
    /// an operation that applied (or may have). A mismatch's expected version
    /// says nothing about the register.
    pub(super) fn version_seen(self) -> Option<u64> {
        match self {
            Action::Cas {
                result: Some(CasResult::Mismatch(current)),
                ..
            }
            | Action::Delete {
                result: Some(DeleteResult::Mismatch(current)),
                ..
            } => Some(current),
            Action::Cas { expected, .. } => Some(expected),
            Action::Delete { expected, .. } => expected,
            Action::Put { .. } | Action::Get(_) => None,
        }
    }
}

/// One operation of a key's sub-history, for the search.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyOp {
    /// History index of the operation.
    pub(super) record: u32,
    /// Event sequence number of the invocation.
    pub(super) call: u64,
    /// Event sequence number of the answer; None when unknown.
    pub(super) ret: Option<u64>,
    pub(super) action: Action,
}

impl KeyOp {
    /// The operation with its answer forgotten; None when it could then as
    /// well never have happened.
    pub(super) fn unanswered(&self) -> Option<KeyOp> {
        let action = self.action.without_answer()?;
        Some(KeyOp {
            ret: None,
            action,
            ..*self
        })
    }

    /// Answered before `other` was invoked.
    pub(super) fn precedes(&self, other: &KeyOp) -> bool {
        self.ret.is_some_and(|ret| ret < other.call)
    }
}
