//! The SQL text of the protocol, embedded at build time from `sql/` (the one place it lives).
//! Python reads the same text through the native module, so both paths run identical statements.

include!(concat!(env!("OUT_DIR"), "/sql_files.rs"));

/// The text of a named statement of `sql/statements/*.sql`; panics on a name that does not exist,
/// which the unit tests below rule out for every name the engine uses.
pub const fn statement(name: &str) -> &'static str {
    let mut i = 0;
    while i < STATEMENTS.len() {
        if const_eq(STATEMENTS[i].0, name) {
            return STATEMENTS[i].1;
        }
        i += 1;
    }
    panic!("no such SQL statement")
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

pub const SEND_COMMANDS: &str = statement("send_commands");
/// The claim in two steps: lease the messages (committed at once), then claim them.
pub const LEASE_MESSAGES: &str = statement("lease_messages");
pub const CLAIM_LEASED: &str = statement("claim_leased");
pub const FINISH_COMMANDS: &str = statement("finish_commands");
/// The flush of outcomes that are all SUCCESS: the common case, fewer columns.
pub const COMPLETE_COMMANDS: &str = statement("complete_commands");
pub const EXTEND_LEASES: &str = statement("extend_leases");
pub const RELEASE_COMMANDS: &str = statement("release_commands");
pub const ENSURE_QUEUE: &str = statement("ensure_queue");
pub const REFRESH_STATISTICS: &str = statement("refresh_statistics");
/// Templates: `{queue_table}` stands for the quoted name of the queue's PGMQ table.
pub const SEND_COMMANDS_DIRECT: &str = statement("send_commands_direct");
pub const RESERVE_MSG_IDS: &str = statement("reserve_msg_ids");

/// A template of the domain's command queue, or None when the domain is not a plain lowercase
/// name (`^[a-z][a-z0-9_]*$`, as `validate_domain` accepts): only such a name is spliced into SQL.
pub fn for_command_queue(template: &str, domain: &str) -> Option<String> {
    let mut chars = domain.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    plain.then(|| {
        let table = format!("\"q_{}\"", command_queue(domain));
        template.replace("{queue_table}", &table)
    })
}

/// Queue of a domain's commands (the predecessor's naming).
pub fn command_queue(domain: &str) -> String {
    format!("{domain}__commands")
}

/// NOTIFY channel that wakes the workers of a queue (the predecessor's naming).
pub fn notify_channel(queue: &str) -> String {
    format!("pgmq_notify_{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        assert_eq!(MIGRATIONS.first().map(|m| m.1), Some("baseline"));
        let mut previous = 0;
        for (version, name, text) in MIGRATIONS {
            // Increasing; a gap is allowed (a branch may add V003 before V002 lands).
            assert!(*version > previous, "V{version:03} after V{previous:03}");
            previous = *version;
            assert!(!text.trim().is_empty());
            // Each migration records itself, so get_schema_sql() run by a tool is tracked.
            let record = format!("VALUES ({version}, '{name}')");
            assert!(text.contains(&record), "V{version:03} does not record itself");
        }
    }

    #[test]
    fn statements_are_named_once_without_their_headers() {
        for (i, (name, text)) in STATEMENTS.iter().enumerate() {
            assert!(!name.is_empty() && !text.is_empty());
            assert!(STATEMENTS[..i].iter().all(|(other, _)| other != name), "{name} twice");
            assert!(!text.contains("-- name:"), "{name} holds another block");
            assert!(
                !text.starts_with("--") && text.trim() == *text,
                "{name} keeps its header"
            );
        }
        assert!(SEND_COMMANDS_DIRECT.contains("{queue_table}"));
        assert!(RESERVE_MSG_IDS.contains("{queue_table}"));
    }

    #[test]
    fn statements_are_single_and_use_versioned_functions() {
        for (name, text) in STATEMENTS.iter().filter(|(_, text)| !text.contains("$$")) {
            assert!(
                !text.trim_end().trim_end_matches(';').contains(';'),
                "{name} holds two statements"
            );
        }
        assert!(SEND_COMMANDS.contains("send_commands_v2"));
        assert!(FINISH_COMMANDS.contains("finish_commands_v1"));
        assert!(COMPLETE_COMMANDS.contains("complete_commands_v1"));
        assert!(LEASE_MESSAGES.contains("lease_messages_v1"));
        assert!(CLAIM_LEASED.contains("claim_leased_v1"));
    }

    #[test]
    fn direct_send_names_the_queue_table_of_plain_domains_only() {
        let text = for_command_queue(SEND_COMMANDS_DIRECT, "orders_2").expect("plain domain");
        assert!(text.contains("INSERT INTO pgmq.\"q_orders_2__commands\" "));
        assert!(text.contains("'pgmq.\"q_orders_2__commands\"'"));
        assert!(!text.contains("{queue_table}"));
        let text = for_command_queue(RESERVE_MSG_IDS, "orders_2").expect("plain domain");
        assert!(text.contains("'pgmq.\"q_orders_2__commands\"'") && !text.contains("{queue_table}"));
        for bad in ["", "Orders", "2orders", "or\"ders", "or'ders", "or ders", "ordérs"] {
            assert!(
                for_command_queue(SEND_COMMANDS_DIRECT, bad).is_none(),
                "{bad:?} spliced"
            );
        }
    }

    #[test]
    fn queue_and_channel_names() {
        assert_eq!(command_queue("orders"), "orders__commands");
        assert_eq!(notify_channel("orders__commands"), "pgmq_notify_orders__commands");
    }
}
