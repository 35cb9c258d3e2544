//! Replicas on one PostgreSQL: what another replica changed reaches the agents connected to
//! this one, and what their agents acknowledged reaches this one's waiters. A dedicated
//! connection `LISTEN`s for the changes' notifications; after every (re)connect this replica
//! resynchronises its agents from the store (a snapshot), so a notification missed while the
//! connection was down never matters. A second connection publishes this replica's
//! acknowledgements (see [`acks`]).

pub mod acks;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Socket};

use crate::agent_link::server::AgentServer;
use crate::agent_link::{AgentEvent, AgentLink};
use crate::store::postgres::{CHANNEL, Changed, Connection, Note};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the other replicas until the task is aborted.
pub async fn follow(conn: Connection, replica: String, agent: AgentServer) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = match &conn.tls {
            Some(tls) => session(&conn, tls.clone(), &replica, &agent).await,
            None => session(&conn, tokio_postgres::NoTls, &replica, &agent).await,
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, "following the other replicas"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A connection whose notifications arrive on the returned channel as (channel, payload).
async fn connect<T>(
    conn: &Connection,
    tls: T,
) -> Result<(Client, mpsc::UnboundedReceiver<(String, String)>), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = conn.config.connect(tls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "PostgreSQL connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// One session: listen, resync the agents, read the others' acknowledgements, then follow
/// notifications and publish this replica's acknowledgements until a connection fails.
async fn session<T>(
    conn: &Connection,
    tls: T,
    replica: &str,
    agent: &AgentServer,
) -> Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket> + Clone,
    T::Stream: Send + 'static,
{
    let (client, mut notes) = connect(conn, tls.clone()).await?;
    let (mut publisher, _) = connect(conn, tls).await?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {}", acks::ACK_CHANNEL))
        .await?;
    tracing::info!("following the other replicas");
    // Whatever changed while this replica was not listening reaches its agents now.
    if let Err(e) = AgentLink::resync(agent).await {
        tracing::warn!(error = %e, "resynchronising agents after (re)connecting to PostgreSQL");
    }
    acks::load_all(&client, replica, agent).await?;
    let publishing = acks::publish(&mut publisher, replica, agent);
    tokio::pin!(publishing);
    let mut presence = tokio::time::interval(acks::PRESENCE);
    loop {
        tokio::select! {
            note = notes.recv() => {
                let Some((channel, payload)) = note else {
                    return Ok(());
                };
                if channel == acks::ACK_CHANNEL {
                    if payload != replica {
                        acks::load(&client, &payload, true, agent).await?;
                    }
                } else {
                    deliver(&payload, replica, agent);
                }
            }
            result = &mut publishing => return result,
            _ = presence.tick() => acks::load_all(&client, replica, agent).await?,
        }
    }
}

/// Pushes another replica's change to this replica's agents.
fn deliver(payload: &str, replica: &str, agent: &AgentServer) {
    let note: Note = match serde_json::from_str(payload) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed change notification");
            return;
        }
    };
    if note.replica == replica {
        return;
    }
    let event = match note.what {
        Changed::Secret(id) => AgentEvent::SecretChanged { id },
        Changed::Sandbox(id) => AgentEvent::SandboxChanged { id },
    };
    // Messages are built from the store's current state, so deliveries may overlap.
    let agent = agent.clone();
    tokio::spawn(async move {
        if let Err(e) = agent.notify(event).await {
            tracing::debug!(error = %e, "pushing another replica's change");
        }
    });
}
