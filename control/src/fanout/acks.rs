//! Acknowledgements across replicas, database side: each replica writes what its agents
//! acknowledged (and a presence stamp every [`PRESENCE`]) and announces it; the others read it
//! into their [`AgentServer`]. A replica not seen for [`GONE_AFTER`] counts as gone: its agents
//! are shown disconnected (they keep enforcing what they had).

use std::time::Duration;

use tokio_postgres::Client;
use veil_link::{AgentId, Revision, SecretId};

use crate::agent_link::server::{AgentServer, PublishedAck};

/// The channel acknowledgement changes are announced on (payload: the replica id).
pub const ACK_CHANNEL: &str = "veil_ack";
/// How often a replica refreshes its presence.
pub const PRESENCE: Duration = Duration::from_secs(2);
/// How long without a presence stamp before a replica counts as gone.
const GONE_AFTER: Duration = Duration::from_secs(10);
/// How long acknowledgement changes are gathered before one write (a snapshot acknowledges
/// many secrets at once).
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Current time in the database, ms since the epoch: one clock for every replica.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Writes this replica's acknowledgements and presence until the connection fails.
pub async fn publish(
    client: &mut Client,
    replica: &str,
    agent: &AgentServer,
) -> Result<(), tokio_postgres::Error> {
    let mut last: Option<Vec<PublishedAck>> = None;
    loop {
        let acks = agent.published();
        let tx = client.transaction().await?;
        // Unchanged acknowledgements are not rewritten: the tick only refreshes the presence.
        let changed = last.as_ref() != Some(&acks);
        if changed {
            write_acks(&tx, replica, &acks).await?;
        }
        tx.execute(
            &format!(
                "INSERT INTO replicas (id, seen_at) VALUES ($1, {DB_NOW_MS}) \
                 ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at"
            ),
            &[&replica],
        )
        .await?;
        if changed {
            tx.execute("SELECT pg_notify($1, $2)", &[&ACK_CHANNEL, &replica])
                .await?;
        }
        tx.commit().await?;
        last = Some(acks);
        // The next change, or the next presence stamp, whichever comes first.
        let _ = tokio::time::timeout(PRESENCE, agent.local_changed()).await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// Replaces `replica`'s rows with `acks`, in one statement whatever their number.
async fn write_acks(
    tx: &tokio_postgres::Transaction<'_>,
    replica: &str,
    acks: &[PublishedAck],
) -> Result<(), tokio_postgres::Error> {
    tx.execute("DELETE FROM agent_acks WHERE replica = $1", &[&replica])
        .await?;
    let secrets: Vec<&str> = acks.iter().map(|a| a.secret_id.as_str()).collect();
    let agents: Vec<&str> = acks.iter().map(|a| a.agent_id.as_str()).collect();
    let revisions: Vec<Option<i64>> = acks
        .iter()
        .map(|a| a.revision.map(|r| i64::try_from(r.0).unwrap_or(i64::MAX)))
        .collect();
    let at: Vec<Option<i64>> = acks.iter().map(|a| a.at).collect();
    let connected: Vec<bool> = acks.iter().map(|a| a.connected).collect();
    tx.execute(
        "INSERT INTO agent_acks (replica, secret_id, agent_id, revision, at, connected) \
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bool[])",
        &[&replica, &secrets, &agents, &revisions, &at, &connected],
    )
    .await?;
    Ok(())
}

/// Reads what every other replica published into `agent` (and forgets replicas gone from the
/// table).
pub async fn load_all(
    client: &Client,
    replica: &str,
    agent: &AgentServer,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT id, ({DB_NOW_MS} - seen_at) < $2 FROM replicas WHERE id <> $1"),
            &[&replica, &gone_after_ms()],
        )
        .await?;
    let mut keep = Vec::with_capacity(rows.len());
    for row in rows {
        let (id, alive): (String, bool) = (row.get(0), row.get(1));
        load(client, &id, alive, agent).await?;
        keep.push(id);
    }
    agent.retain_remote(&keep);
    Ok(())
}

/// Reads what `replica` published into `agent`.
pub async fn load(
    client: &Client,
    replica: &str,
    alive: bool,
    agent: &AgentServer,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT secret_id, agent_id, revision, at, connected FROM agent_acks \
             WHERE replica = $1",
            &[&replica],
        )
        .await?;
    let acks = rows
        .iter()
        .filter_map(|r| {
            // Rows another replica wrote through the same checked types; one that does not
            // parse is skipped rather than trusted.
            let secret_id = SecretId::parse(r.get::<_, String>(0)).ok()?;
            let agent_id = AgentId::parse(r.get::<_, String>(1)).ok()?;
            let revision: Option<i64> = r.get(2);
            Some(PublishedAck {
                secret_id,
                agent_id,
                revision: revision.and_then(|v| u64::try_from(v).ok()).map(Revision),
                at: r.get(3),
                connected: r.get(4),
            })
        })
        .collect();
    agent.set_remote(replica, alive, acks);
    Ok(())
}

fn gone_after_ms() -> i64 {
    i64::try_from(GONE_AFTER.as_millis()).unwrap_or(i64::MAX)
}
