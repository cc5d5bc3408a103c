//! The names of work entries and what `/proc/PID/stat` says of a process (pure parsers).

/// What every work entry's name starts with (after an optional dot, for entries hidden beside
/// a target).
const PREFIX: &str = "imgforge-";

/// Hex digits of the host tag in a name.
const HOST_TAG_DIGITS: usize = 8;

/// The process a work entry belongs to, as recorded in its name:
/// `imgforge-<pid>-<start time>-<host>-<kind>-<anything>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkName {
    /// The process id of the imgforge that made the entry.
    pub pid: u32,
    /// That process's start time (clock ticks after boot, `/proc/PID/stat` field 22); 0 when
    /// it could not be read, which makes the entry removable only once the pid is gone.
    pub start_time: u64,
    /// Where the pid means something (see [`host_tag`]): a pid of another machine sharing the
    /// directory, or of another pid namespace, says nothing about the processes seen here.
    pub host: u32,
}

impl WorkName {
    /// The start of the names this process gives entries of `kind` (e.g. `job`, `download`).
    pub fn prefix(&self, kind: &str) -> String {
        format!("{PREFIX}{}-{}-{:08x}-{kind}-", self.pid, self.start_time, self.host)
    }

    /// The process a work entry's `name` records, if it is one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix('.').unwrap_or(name).strip_prefix(PREFIX)?;
        let (pid, rest) = rest.split_once('-')?;
        let (start_time, rest) = rest.split_once('-')?;
        let (host, rest) = rest.split_once('-')?;
        let host_ok = host.len() == HOST_TAG_DIGITS && host.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if rest.is_empty() || !is_number(pid) || !is_number(start_time) || !host_ok {
            return None;
        }
        let pid = pid.parse().ok().filter(|p| *p > 0)?;
        Some(Self { pid, start_time: start_time.parse().ok()?, host: u32::from_str_radix(host, 16).ok()? })
    }
}

/// The tag naming where pids are looked up: the machine (its machine id and host name) and the
/// pid namespace (its inode), hashed (FNV-1a) into 32 bits. Two imgforges sharing a directory
/// (a container and its host, two nodes on one shared file storage) tag differently, so
/// neither takes the other's live entries for a dead process's (pure).
pub fn host_tag(machine_id: &str, host_name: &str, pid_namespace: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in [machine_id.trim(), host_name.trim(), pid_namespace.trim()].join("\0").bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    hash
}

/// Only ASCII digits (`str::parse` also takes a leading `+`).
fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// What `/proc/PID/stat` tells about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Parses the contents of `/proc/PID/stat`. The command name (field 2) is in parentheses
    /// and may hold spaces and parentheses itself, so fields are counted after the last `)`.
    pub fn parse(text: &str) -> Option<Self> {
        let (_, after_name) = text.rsplit_once(')')?;
        let mut fields = after_name.split_whitespace();
        let mut state = fields.next()?.chars();
        let (state, None) = (state.next()?, state.next()) else { return None };
        // Field 3 was the state; field 22 is 19 further.
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(Self { state, start_time })
    }

    /// A zombie or dead process holds no file: what it made is left over.
    pub fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (pid, start_time, host) in [(1, 0, 0), (4242, 1_234_567, 0xdead_beef), (u32::MAX, u64::MAX, u32::MAX)] {
            let name = WorkName { pid, start_time, host };
            for kind in ["job", "qmp", "download"] {
                let made = format!("{}abc123", name.prefix(kind));
                assert_eq!(WorkName::parse(&made), Some(name), "{made}");
                assert_eq!(WorkName::parse(&format!(".{made}")), Some(name), "hidden {made}");
            }
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "imgforge-abc123",                  // the old unnumbered work dirs
            "imgforge-12-34",                   // nothing after the start time
            "imgforge-12-34-",                  // nothing after the start time
            "imgforge-12-34-job-x",             // no host tag: made before tags, by whom is unknown
            "imgforge-12-34-0000abcd",          // nothing after the host tag
            "imgforge-12-34-0000ABCD-job-x",    // upper-case hex is not how tags are written
            "imgforge-12-34-abcd-job-x",        // a short tag
            "imgforge--34-0000abcd-job-x",      // no pid
            "imgforge-12--0000abcd-job-x",      // no start time
            "imgforge-+12-34-0000abcd-job-x",   // a sign is not a digit
            "imgforge-0-34-0000abcd-job-x",     // pid 0 is no process
            "imgforge-4294967296-1-0000abcd-x", // pid beyond u32
            "imgforge-1-18446744073709551616-0000abcd-x",
            "..imgforge-12-34-0000abcd-job-x",
            "x.imgforge-12-34-0000abcd-job-x",
            ".disk.img.imgforge-1234", // the old temporary output name
            "imgforge-fixtures",
            "systemd-private-abc",
            "",
        ] {
            assert_eq!(WorkName::parse(name), None, "{name}");
        }
    }

    /// Another machine or another pid namespace gives another tag.
    #[test]
    fn host_tags_tell_machines_and_namespaces_apart() {
        let here = host_tag("5f1c", "node1", "pid:[4026531836]");
        assert_eq!(here, host_tag("5f1c\n", "node1\n", "pid:[4026531836]"), "a trailing newline is not part of it");
        assert_ne!(here, host_tag("77aa", "node1", "pid:[4026531836]"));
        assert_ne!(here, host_tag("5f1c", "node2", "pid:[4026531836]"));
        assert_ne!(here, host_tag("5f1c", "node1", "pid:[4026532200]"));
        assert_ne!(host_tag("ab", "c", ""), host_tag("a", "bc", ""), "fields do not run into each other");
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (imgforge) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(ProcStat::parse(stat), Some(ProcStat { state: 'S', start_time: 987_654 }));
        // A command name may hold spaces and parentheses.
        let tricky = "7 (a) Z 1 2 (b) R) Z 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 55 1000 10\n";
        let parsed = ProcStat::parse(tricky).unwrap();
        assert_eq!(parsed, ProcStat { state: 'Z', start_time: 55 });
        assert!(parsed.is_gone());
        for bad in [
            "",
            "4242 (imgforge) S 1 2 3",
            "4242 (imgforge) SS 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 9 1 1",
        ] {
            assert_eq!(ProcStat::parse(bad), None, "{bad}");
        }
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own = ProcStat::parse(&own).unwrap();
        assert!(!own.is_gone());
        assert!(own.start_time > 0);
        assert_eq!(crate::workdir::this_process().start_time, own.start_time);
    }
}
