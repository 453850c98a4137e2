//! What this machine offers sealpass: the kernel and the settings that
//! decide its speed and its limits, read from `/proc` and `/sys` (and one
//! `memfd_create` probe). Both binaries print it with `--doctor`. Reading
//! only: nothing here changes a setting.
#![forbid(unsafe_code)]

use std::fmt;

use crate::memfd::{MFdFlags, memfd_create};
use nix::sys::resource::{Resource, getrlimit};

/// The facts, each `None` where the machine does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Host {
    /// `uname -r`.
    pub kernel: Option<String>,
    /// Whether `memfd_create` takes `MFD_NOEXEC_SEAL` (Linux 6.3+).
    pub noexec_seal: bool,
    /// `vm.memfd_noexec`: 0 allows executable memfds, 1 makes them
    /// non-executable by default, 2 refuses executable ones.
    pub memfd_noexec: Option<u32>,
    /// The shmem transparent huge page mode (`never`, `advise`,
    /// `within_size`, `always`, `deny`, `force`).
    pub shmem_thp: Option<String>,
    /// The hugetlb pool.
    pub hugetlb: Option<HugeTlbPool>,
    /// `RLIMIT_NOFILE`, soft and hard.
    pub nofile: Option<(u64, u64)>,
    /// `vm.max_map_count`: mappings one process may hold.
    pub max_map_count: Option<u64>,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

/// The selected word of a `a [b] c` sysfs list.
fn selected(list: &str) -> Option<String> {
    let start = list.find('[')?;
    let end = list[start..].find(']')? + start;
    list.get(start + 1..end).map(str::to_owned)
}

/// A `Key: value` field of `/proc/meminfo`, as a number.
fn meminfo(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The hugetlb pool of the default huge page size, from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HugeTlbPool {
    /// Pages in the pool (`HugePages_Total`).
    pub total: u64,
    /// Pages not in use (`HugePages_Free`), reserved ones included.
    pub free: u64,
    /// Free pages promised to mappings already (`HugePages_Rsvd`).
    pub reserved: u64,
    /// The size of one page in bytes (`Hugepagesize`).
    pub page_bytes: u64,
}

impl HugeTlbPool {
    /// The pool as `/proc/meminfo`'s text states it; `None` when it names
    /// none (a kernel without hugetlbfs).
    pub(crate) fn from_meminfo(text: &str) -> Option<HugeTlbPool> {
        Some(HugeTlbPool {
            total: meminfo(text, "HugePages_Total")?,
            free: meminfo(text, "HugePages_Free")?,
            reserved: meminfo(text, "HugePages_Rsvd")?,
            page_bytes: meminfo(text, "Hugepagesize")?.checked_mul(1024)?,
        })
    }

    /// This machine's pool, now.
    pub fn read() -> Option<HugeTlbPool> {
        HugeTlbPool::from_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }

    /// Pages a new memfd could still reserve: free and not promised.
    pub fn room(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

impl Host {
    /// Reads the facts of this machine.
    pub fn read() -> Host {
        let noexec = MFdFlags::from_bits_retain(nix::libc::MFD_NOEXEC_SEAL);
        Host {
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            noexec_seal: memfd_create("sealpass-doctor", MFdFlags::MFD_CLOEXEC | noexec).is_ok(),
            memfd_noexec: read_trimmed("/proc/sys/vm/memfd_noexec").and_then(|v| v.parse().ok()),
            shmem_thp: read_trimmed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
                .and_then(|list| selected(&list)),
            hugetlb: HugeTlbPool::read(),
            nofile: getrlimit(Resource::RLIMIT_NOFILE).ok(),
            max_map_count: read_trimmed("/proc/sys/vm/max_map_count").and_then(|v| v.parse().ok()),
        }
    }
}

/// Whether, and how, the kernel gives memfds 2 MiB pages (shmem
/// transparent huge pages): the PMD-size per-size control
/// (`hugepages-2048kB/shmem_enabled`, Linux 6.11+) unless it says
/// `inherit`, else the global `shmem_enabled`. Smaller multi-size pages are
/// not considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmemHugePages {
    /// `never` or `deny`, or no THP at all: 4 KiB pages only.
    Never,
    /// `advise`: huge pages where a mapping asks for them (`MADV_HUGEPAGE`).
    /// A `write` without a mapping gets none.
    Advise,
    /// `always`, `within_size` or `force`: huge pages for any write inside
    /// the file's size, mapped or not.
    Always,
}

impl ShmemHugePages {
    /// The mode from the two sysfs lists (`always within_size advise [never]
    /// deny force`), the per-size one first where the kernel has it.
    pub(crate) fn from_sysfs(global: Option<&str>, pmd_size: Option<&str>) -> ShmemHugePages {
        let chosen = match pmd_size.and_then(selected) {
            Some(mode) if mode != "inherit" => Some(mode),
            _ => global.and_then(selected),
        };
        match chosen.as_deref() {
            Some("advise") => ShmemHugePages::Advise,
            Some("always" | "within_size" | "force") => ShmemHugePages::Always,
            _ => ShmemHugePages::Never,
        }
    }

    /// This machine's mode, read from sysfs now.
    pub fn read() -> ShmemHugePages {
        ShmemHugePages::from_sysfs(
            read_trimmed("/sys/kernel/mm/transparent_hugepage/shmem_enabled").as_deref(),
            read_trimmed("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled")
                .as_deref(),
        )
    }

    /// Whether a mapping of `size` bytes should ask for huge pages
    /// (`MADV_HUGEPAGE`): at least one 2 MiB page, and a mode that heeds it.
    pub fn advise_for(self, size: u64) -> bool {
        size >= HUGE_PAGE && self != ShmemHugePages::Never
    }
}

/// The huge page size shmem uses on x86_64 and aarch64 with 4 KiB pages.
pub const HUGE_PAGE: u64 = 2 << 20;

/// One finding: what, what it means for sealpass, and how to change it.
fn item(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    value: &str,
    meaning: &str,
    change: &str,
) -> fmt::Result {
    writeln!(f, "{what}: {value}")?;
    writeln!(f, "    {meaning}")?;
    if !change.is_empty() {
        writeln!(f, "    change: {change}")?;
    }
    Ok(())
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = || "unknown".to_owned();
        item(
            f,
            "kernel",
            &self.kernel.clone().unwrap_or_else(unknown),
            "memfd sealing needs 3.17+; F_SEAL_FUTURE_WRITE 5.1+; MFD_NOEXEC_SEAL and F_SEAL_EXEC 6.3+; \
             read-only shared mappings of write-sealed memfds 6.7+ (before, a private read-only one is used)",
            "",
        )?;
        item(
            f,
            "MFD_NOEXEC_SEAL",
            if self.noexec_seal {
                "supported"
            } else {
                "not supported (kernel before 6.3)"
            },
            "senders create memfds with it where supported, so they also carry EXEC; \
             receivers compare seals as a superset, so either way works",
            "",
        )?;
        item(
            f,
            "vm.memfd_noexec",
            &self.memfd_noexec.map_or_else(unknown, |v| v.to_string()),
            "0 or 1: memfds are created as usual; 2: executable memfds are refused, which sealpass never asks for",
            "sysctl -w vm.memfd_noexec=0",
        )?;
        let thp = self.shmem_thp.clone().unwrap_or_else(unknown);
        item(
            f,
            "shmem transparent huge pages",
            &thp,
            match thp.as_str() {
                "never" | "deny" => {
                    "off: every 4 KiB page of a memfd faults and is zeroed on its own when \
                     filled and again when first read; with huge pages a 2 MiB page takes one fault"
                }
                "advise" => "on where asked (MADV_HUGEPAGE): big segments can use 2 MiB pages",
                _ => "on: big segments use 2 MiB pages, far fewer faults when filling and reading",
            },
            "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled",
        )?;
        item(
            f,
            "hugetlb pool",
            &self.hugetlb.map_or_else(unknown, |pool| {
                format!(
                    "{} pages of {} KiB, {} free for new memfds",
                    pool.total,
                    pool.page_bytes / 1024,
                    pool.room()
                )
            }),
            "sealpass-send --hugetlb (Pages::HugeTlb in the library) takes segments of whole \
             huge pages from here while it has room, one fault per huge page; without free \
             pages they use the page cache (shmem)",
            "sysctl -w vm.nr_hugepages=N",
        )?;
        item(
            f,
            "RLIMIT_NOFILE",
            &self
                .nofile
                .map_or_else(unknown, |(soft, hard)| format!("{soft} (hard {hard})")),
            "every connection and every segment in flight holds an fd; a receiver near the limit \
             refuses new connections (ResourceExhausted) and transfers (ControlTruncated); a \
             receiver takes soft/506 queued messages per batch (at least 1; 32 from 16192); \
             sealpass-recv raises its soft limit to the hard one when it starts",
            "ulimit -n N (or LimitNOFILE= in a systemd unit)",
        )?;
        item(
            f,
            "vm.max_map_count",
            &self.max_map_count.map_or_else(unknown, |v| v.to_string()),
            "every segment held mapped is one mapping; past the limit mapping fails with ENOMEM, \
             answered Reject(ResourceExhausted)",
            "sysctl -w vm.max_map_count=N",
        )?;
        item(
            f,
            "sparse memfds",
            "refused (Reject(Sparse))",
            "a hole of a memfd is allocated when the receiver reads it, charged to the receiver for \
             as long as the sender keeps the memfd; receivers refuse memfds with fewer bytes \
             allocated than their size, and sealpass's senders allocate every page before sealing",
            "sealpass-recv --allow-sparse accepts them, at that risk",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_mode(global: Option<&str>, pmd_size: Option<&str>, expected: ShmemHugePages) {
        assert_eq!(
            ShmemHugePages::from_sysfs(global, pmd_size),
            expected,
            "{global:?} / {pmd_size:?}"
        );
    }

    #[test]
    fn shmem_huge_page_modes() {
        use ShmemHugePages::*;
        // A sysfs list of `modes` with `mode` selected.
        let list_of = |modes: &[&str], mode: &str| {
            modes
                .iter()
                .map(|m| {
                    if *m == mode {
                        format!("[{m}]")
                    } else {
                        (*m).to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let list = |mode| {
            list_of(
                &["always", "within_size", "advise", "never", "deny", "force"],
                mode,
            )
        };
        let per_size = |mode| {
            list_of(
                &["always", "inherit", "within_size", "advise", "never"],
                mode,
            )
        };
        for (global, expected) in [
            ("never", Never),
            ("deny", Never),
            ("advise", Advise),
            ("always", Always),
            ("within_size", Always),
            ("force", Always),
        ] {
            check_mode(Some(&list(global)), None, expected);
            check_mode(Some(&list(global)), Some(&per_size("inherit")), expected);
        }
        check_mode(Some(&list("never")), Some(&per_size("advise")), Advise);
        check_mode(Some(&list("advise")), Some(&per_size("never")), Never);
        check_mode(Some(&list("never")), Some(&per_size("within_size")), Always);
        check_mode(None, None, Never);
        check_mode(Some("garbage"), None, Never);
        assert!(Advise.advise_for(HUGE_PAGE) && !Advise.advise_for(HUGE_PAGE - 1));
        assert!(!Never.advise_for(1 << 30));
    }

    #[test]
    fn sysfs_lists_and_meminfo_fields() {
        assert_eq!(
            selected("always within_size advise [never] deny force").as_deref(),
            Some("never")
        );
        assert_eq!(selected("[advise] never").as_deref(), Some("advise"));
        assert_eq!(selected("no brackets"), None);
        let text = "MemTotal: 100 kB\nHugePages_Total:       4\nHugepagesize:    2048 kB\n";
        assert_eq!(meminfo(text, "HugePages_Total"), Some(4));
        assert_eq!(meminfo(text, "Hugepagesize"), Some(2048));
        assert_eq!(meminfo(text, "HugePages_Free"), None);
    }

    #[test]
    fn hugetlb_pool_table() {
        fn check(text: &str, expected: Option<(u64, u64, u64, u64, u64)>) {
            let pool = HugeTlbPool::from_meminfo(text);
            let got = pool.map(|p| (p.total, p.free, p.reserved, p.page_bytes, p.room()));
            assert_eq!(got, expected, "{text:?}");
        }
        let fields = |total, free, reserved| {
            format!(
                "HugePages_Total: {total}\nHugePages_Free: {free}\nHugePages_Rsvd: {reserved}\n\
                 HugePages_Surp: 0\nHugepagesize: 2048 kB\n"
            )
        };
        check(&fields(0, 0, 0), Some((0, 0, 0, 2 << 20, 0)));
        check(&fields(16, 12, 2), Some((16, 12, 2, 2 << 20, 10)));
        check(&fields(16, 2, 2), Some((16, 2, 2, 2 << 20, 0)));
        // No hugetlbfs: the fields are missing.
        check("MemTotal: 100 kB\n", None);
        check(
            "HugePages_Total: 1\nHugePages_Free: 1\nHugepagesize: 2048 kB\n",
            None,
        );
    }

    #[test]
    fn the_report_names_every_fact_and_how_to_change_it() {
        let report = Host::read().to_string();
        for expected in [
            "kernel: ",
            "MFD_NOEXEC_SEAL: ",
            "vm.memfd_noexec: ",
            "shmem transparent huge pages: ",
            "hugetlb pool: ",
            "RLIMIT_NOFILE: ",
            "vm.max_map_count: ",
            "change: sysctl -w vm.max_map_count=N",
        ] {
            assert!(report.contains(expected), "{expected:?} missing:\n{report}");
        }
    }
}
