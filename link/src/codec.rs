//! Framing: a 4-byte big-endian length, then that many bytes of JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// Largest frame either side accepts (a snapshot of many sandboxes and 64 KiB values).
pub const MAX_FRAME: u32 = 64 << 20;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    /// The payload is not a valid message. (The serde error is not kept: it may quote input.)
    #[error("malformed message at line {line} column {column}")]
    Malformed {
        /// Line of the JSON error.
        line: usize,
        /// Column of the JSON error.
        column: usize,
    },
}

/// Reads one message; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<T, R>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Frames carry secret values: wipe the raw bytes once parsed.
    let mut buf = Zeroizing::new(vec![0u8; len as usize]);
    reader.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| FrameError::Malformed {
            line: e.line(),
            column: e.column(),
        })
}

/// Writes one message as a frame and flushes it.
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let body = Zeroizing::new(serde_json::to_vec(msg).map_err(|e| FrameError::Malformed {
        line: e.line(),
        column: e.column(),
    })?);
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(u32::MAX))?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(&body).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AgentMsg;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let m = AgentMsg::Applied {
            seq: 3,
            errors: vec!["x".into()],
        };
        write_frame(&mut a, &m).await.unwrap();
        assert_eq!(read_frame::<AgentMsg, _>(&mut b).await.unwrap(), Some(m));
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<AgentMsg, _>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
        drop(a);
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{x}").await.unwrap();
        assert!(matches!(
            read_frame::<AgentMsg, _>(&mut b).await,
            Err(FrameError::Malformed { .. })
        ));
        drop(a);
        assert_eq!(read_frame::<AgentMsg, _>(&mut b).await.unwrap(), None);
    }
}
