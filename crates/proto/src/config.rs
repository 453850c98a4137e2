//! What a receiver requires and allows: one configuration for policy, limits
//! and access, shared by every way of receiving (a single connection, a
//! listener, the concurrent service, the async driver).
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::limits::MAX_SEGMENTS;
use crate::seals::Seals;
use crate::verify::Policy;

/// Who is at the other end of a unix socket, as the kernel recorded it at
/// `connect` (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCredentials {
    /// The peer's process id.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

impl std::fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// Who may connect, by the credentials the kernel recorded at `connect`
/// (`SO_PEERCRED`). With no uid and no gid listed, everyone may; otherwise a
/// peer whose uid or gid is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Access {
    /// Everyone who can open the socket.
    pub fn anyone() -> Access {
        Access::default()
    }

    /// This list, also admitting user `uid`.
    #[must_use]
    pub fn allow_uid(mut self, uid: u32) -> Access {
        self.uids.push(uid);
        self
    }

    /// This list, also admitting group `gid`.
    #[must_use]
    pub fn allow_gid(mut self, gid: u32) -> Access {
        self.gids.push(gid);
        self
    }

    /// The user ids admitted.
    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// The group ids admitted.
    pub fn gids(&self) -> &[u32] {
        &self.gids
    }

    /// Whether anyone may connect.
    pub fn admits_anyone(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// Whether `peer` may connect.
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        self.admits_anyone() || self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid)
    }
}

/// A receiver's configuration: the seals it requires, its limits, who may
/// connect. Build one with [`Config::builder`]; [`Config::default`] is what
/// `sealpass-recv` runs with when given no flags.
///
/// ```
/// use std::time::Duration;
/// use sealpass_proto::{Config, Seals};
///
/// let config = Config::builder()
///     .required_seals(Seals::RECEIVER_DEFAULT | Seals::SEAL)
///     .max_connections(16)
///     .max_mapped_total(1 << 30)
///     .idle_timeout(Some(Duration::from_secs(5)))
///     .build()?;
/// assert_eq!(config.max_connections(), 16);
/// // SHRINK and WRITE can never be dropped: the receiver maps the bytes.
/// assert!(config.policy().required().contains(Seals::MAPPING_FLOOR));
/// # Ok::<(), sealpass_proto::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    policy: Policy,
    access: Access,
    max_connections: usize,
    max_segments: usize,
    max_mapped_per_connection: u64,
    max_mapped_total: u64,
    first_message_deadline: Option<Duration>,
    idle_timeout: Option<Duration>,
    populate: bool,
    copy_at_most: u64,
}

/// Segments of at most this many bytes are read into the receiver's own
/// memory rather than mapped, unless configured otherwise: below it a copy
/// (`pread`) and a read of every byte cost less than a mapping read in
/// full and unmapped (`cargo xtask bench --checks`: 0.6 against 5.7 µs at
/// 4 KiB, 10.4 against 16.9 at 128 KiB, 22.7 against 25.5 at 256 KiB,
/// even at 1 MiB).
pub const DEFAULT_COPY_AT_MOST: u64 = 256 << 10;

impl Default for Config {
    /// SHRINK, GROW and WRITE required, sparse memfds refused, anyone
    /// admitted, 128 connections, 253 segments per message, 8 GiB mapped per
    /// connection and 64 GiB in all, 10 s to the first message, 30 s idle.
    fn default() -> Config {
        Config {
            policy: Policy::default(),
            access: Access::anyone(),
            max_connections: 128,
            max_segments: MAX_SEGMENTS,
            max_mapped_per_connection: 8 << 30,
            max_mapped_total: 64 << 30,
            first_message_deadline: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(30)),
            populate: false,
            copy_at_most: DEFAULT_COPY_AT_MOST,
        }
    }
}

impl Config {
    /// A builder starting from [`Config::default`].
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// A builder starting from this configuration.
    pub fn to_builder(&self) -> ConfigBuilder {
        ConfigBuilder {
            config: self.clone(),
        }
    }

    /// The seals required of every segment, and whether holes are refused.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Who may connect.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Connections served at once; one more is refused (`TooManyConnections`).
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Segments per message; more is `TooManySegments`.
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// Bytes one connection's transfers may hold mapped at once; more is
    /// `MemoryLimit`.
    pub fn max_mapped_per_connection(&self) -> u64 {
        self.max_mapped_per_connection
    }

    /// Bytes all connections together may hold mapped; more is `MemoryLimit`.
    pub fn max_mapped_total(&self) -> u64 {
        self.max_mapped_total
    }

    /// Time a new connection has to send its first complete message (then
    /// `Timeout`); `None`: forever.
    pub fn first_message_deadline(&self) -> Option<Duration> {
        self.first_message_deadline
    }

    /// Silence allowed between messages while no answer is owed (then
    /// `Timeout`), and time an answer may wait for room in the peer's
    /// queue; `None`: forever.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Whether mappings fault every page in when made (`MAP_POPULATE`).
    pub fn populate(&self) -> bool {
        self.populate
    }

    /// Segments of at most this many bytes (and more than none) are read
    /// into the receiver's own memory after verification instead of
    /// mapped; 0: every segment is mapped.
    pub fn copy_at_most(&self) -> u64 {
        self.copy_at_most
    }
}

/// Why a configuration cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The segment limit is outside 1 to 253.
    #[error("max_segments {found}; expected 1 to {MAX_SEGMENTS}")]
    MaxSegments {
        /// The value given.
        found: usize,
    },
    /// The connection limit is 0.
    #[error("max_connections 0; expected at least 1")]
    NoConnections,
}

/// Builds a [`Config`]; every setter starts from the defaults.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    config: Config,
}

impl ConfigBuilder {
    /// The seals every segment must carry, beyond those it declares.
    /// [`Seals::MAPPING_FLOOR`] (SHRINK, WRITE) is always added.
    pub fn required_seals(mut self, seals: Seals) -> Self {
        self.config.policy =
            Policy::new(seals).with_refuse_sparse(self.config.policy.refuses_sparse());
        self
    }

    /// Refuse memfds with holes (`Sparse`), as by default, or accept them
    /// (`false`). Accepting them lets a sender charge this process's memory:
    /// see [`Policy::with_refuse_sparse`].
    pub fn refuse_sparse(mut self, refuse: bool) -> Self {
        self.config.policy = self.config.policy.with_refuse_sparse(refuse);
        self
    }

    /// Who may connect.
    pub fn access(mut self, access: Access) -> Self {
        self.config.access = access;
        self
    }

    /// Connections served at once.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.config.max_connections = max;
        self
    }

    /// Segments per message, 1 to 253.
    pub fn max_segments(mut self, max: usize) -> Self {
        self.config.max_segments = max;
        self
    }

    /// Bytes one connection's transfers may hold mapped at once.
    pub fn max_mapped_per_connection(mut self, bytes: u64) -> Self {
        self.config.max_mapped_per_connection = bytes;
        self
    }

    /// Bytes all connections together may hold mapped.
    pub fn max_mapped_total(mut self, bytes: u64) -> Self {
        self.config.max_mapped_total = bytes;
        self
    }

    /// Time to the first complete message (`None`: forever).
    pub fn first_message_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.config.first_message_deadline = deadline;
        self
    }

    /// Silence allowed between messages (`None`: forever).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Both timeouts at once: to the first message and between messages.
    pub fn timeouts(self, timeout: Option<Duration>) -> Self {
        self.first_message_deadline(timeout).idle_timeout(timeout)
    }

    /// Fault every page in at mapping time (`MAP_POPULATE`): faster for
    /// handlers that read every byte, wasted work for those that read
    /// little. Off by default.
    pub fn populate(mut self, populate: bool) -> Self {
        self.config.populate = populate;
        self
    }

    /// Read segments of at most `bytes` into memory of the receiver's own
    /// instead of mapping them (default [`DEFAULT_COPY_AT_MOST`]; 0 maps
    /// every segment). A segment sealed against writes cannot change, so
    /// the copy, taken after verification, holds the bytes a mapping would
    /// show; the application still gets read-only bytes, and the sealed fd
    /// stays with the segment. Copied bytes count in the memory budgets as
    /// mapped ones do.
    pub fn copy_at_most(mut self, bytes: u64) -> Self {
        self.config.copy_at_most = bytes;
        self
    }

    /// The configuration, if its values are in range.
    pub fn build(self) -> Result<Config, ConfigError> {
        let config = self.config;
        if !(1..=MAX_SEGMENTS).contains(&config.max_segments) {
            return Err(ConfigError::MaxSegments {
                found: config.max_segments,
            });
        }
        if config.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_checks_ranges_and_keeps_the_floor() {
        assert_eq!(
            Config::builder().max_segments(0).build(),
            Err(ConfigError::MaxSegments { found: 0 })
        );
        assert_eq!(
            Config::builder().max_segments(254).build(),
            Err(ConfigError::MaxSegments { found: 254 })
        );
        assert_eq!(
            Config::builder().max_connections(0).build(),
            Err(ConfigError::NoConnections)
        );
        let config = Config::builder()
            .required_seals(Seals::empty())
            .build()
            .unwrap();
        assert_eq!(config.policy().required(), Seals::MAPPING_FLOOR);
        assert!(config.policy().refuses_sparse(), "refused by default");
        let accepting = Config::builder()
            .refuse_sparse(false)
            .required_seals(Seals::empty())
            .build()
            .unwrap();
        assert!(
            !accepting.policy().refuses_sparse(),
            "kept across required_seals"
        );
        assert_eq!(Config::builder().build().unwrap(), Config::default());
    }

    #[test]
    fn access_table() {
        let peer = |uid, gid| PeerCredentials { pid: 1, uid, gid };
        let check = |access: &Access, uid, gid, expected: bool| {
            assert_eq!(
                access.allows(&peer(uid, gid)),
                expected,
                "{access:?} {uid}/{gid}"
            );
        };
        check(&Access::anyone(), 5, 5, true);
        let uid = Access::anyone().allow_uid(1000);
        check(&uid, 1000, 1, true);
        check(&uid, 1001, 1000, false);
        let both = uid.allow_gid(50);
        check(&both, 7, 50, true);
        check(&both, 7, 51, false);
    }
}
