//! Replicas on one PostgreSQL: what another replica changed reaches the agents connected to
//! this one. A dedicated connection `LISTEN`s for the changes' notifications; after every
//! (re)connect this replica resynchronises its agents from the store (a snapshot), so a
//! notification missed while the connection was down never matters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Socket};

use crate::agent_link::{AgentEvent, AgentLink};
use crate::store::postgres::{CHANNEL, Changed, Connection, Note};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the other replicas' changes until the task is aborted.
pub async fn follow(conn: Connection, replica: String, agent: Arc<dyn AgentLink>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = match &conn.tls {
            Some(tls) => listen(&conn, tls.clone(), &replica, &agent).await,
            None => listen(&conn, tokio_postgres::NoTls, &replica, &agent).await,
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(error = %e, "following other replicas' changes"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: listen, resync the agents, then apply notifications until it ends.
async fn listen<T>(
    conn: &Connection,
    tls: T,
    replica: &str,
    agent: &Arc<dyn AgentLink>,
) -> Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = conn.config.connect(tls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    tracing::info!("following other replicas' changes");
    // Whatever changed while this replica was not listening reaches its agents now.
    if let Err(e) = agent.resync().await {
        tracing::warn!(error = %e, "resynchronising agents after (re)connecting to PostgreSQL");
    }
    while let Some(payload) = rx.recv().await {
        let note: Note = match serde_json::from_str(&payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed change notification");
                continue;
            }
        };
        if note.replica == replica {
            continue;
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
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
