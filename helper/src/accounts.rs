//! The guest's `/etc/passwd` and `/etc/shadow`, parsed and edited as text.

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Finds `user` in passwd text; malformed lines are skipped.
pub fn find_user(passwd: &str, user: &str) -> Option<PasswdEntry> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != user {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_owned(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_owned(),
        })
    })
}

/// The id of `group` in `/etc/group` text; malformed lines are skipped.
pub fn find_group_id(group_file: &str, group: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || f[0] != group {
            return None;
        }
        f[2].parse().ok()
    })
}

/// Returns shadow text with `user`'s password field replaced; `None` if the user has no line.
pub fn set_shadow_field(shadow: &str, user: &str, field: &str) -> Option<String> {
    let mut found = false;
    let mut out = String::with_capacity(shadow.len() + field.len());
    for line in shadow.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let mut fields: Vec<&str> = body.split(':').collect();
        if !found && fields.len() >= 2 && fields[0] == user {
            found = true;
            fields[1] = field;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(body);
        }
        out.push_str(nl);
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nbroken\nalice:x:1000:1000:A,,,:/home/alice:/bin/bash\n";
    const SHADOW: &str = "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n";

    #[test]
    fn finds_users() {
        assert_eq!(
            find_user(PASSWD, "alice"),
            Some(PasswdEntry { name: "alice".into(), uid: 1000, gid: 1000, home: "/home/alice".into() })
        );
        assert_eq!(find_user(PASSWD, "root").unwrap().home, "/root");
        assert_eq!(find_user(PASSWD, "bob"), None);
        assert_eq!(find_user(PASSWD, "broken"), None);
    }

    #[test]
    fn finds_groups() {
        let group = "root:x:0:\nbroken\nadm:x:4:syslog,alice\nodd:x:notanumber:\n";
        assert_eq!(find_group_id(group, "adm"), Some(4));
        assert_eq!(find_group_id(group, "root"), Some(0));
        assert_eq!(find_group_id(group, "odd"), None);
        assert_eq!(find_group_id(group, "alice"), None);
        assert_eq!(find_group_id(group, "broken"), None);
    }

    #[test]
    fn sets_only_the_named_user() {
        let out = set_shadow_field(SHADOW, "alice", "$6$s$h").unwrap();
        assert_eq!(out, "root:*:19000:0:99999:7:::\nalice:$6$s$h:19000:0:99999:7:::\n");
        assert_eq!(set_shadow_field("root:x:1::::::", "root", "*").unwrap(), "root:*:1::::::");
        assert_eq!(set_shadow_field(SHADOW, "bob", "*"), None);
    }
}
