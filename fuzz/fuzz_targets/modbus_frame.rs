//! Modbus/TCP bytes from a peer (or a PLC), which the inbound proxy frames to check function
//! codes. Two passes: the framer over the whole input, checking what it reports, and the
//! real relay between in-memory streams with an echoing PLC, the input cut where its first
//! byte says so that frames arrive in pieces. Neither may panic or hang.
#![no_main]
use agent::proxy::modbus::{self, Access};
use agent::proxy::relay::{self, Traffic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut offset = 0;
    while let Ok(Some(frame)) = modbus::frame(&rest[offset..]) {
        assert!((8..=modbus::MAX_FRAME).contains(&frame.len));
        assert!(offset + frame.len <= rest.len());
        let answer = modbus::exception(&frame, modbus::ILLEGAL_FUNCTION);
        assert_eq!(
            modbus::frame(&answer),
            Ok(Some(modbus::Frame {
                len: 9,
                function: frame.function | 0x80,
                ..frame
            }))
        );
        offset += frame.len;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (peer, proxy_side) = tokio::io::duplex(1024);
        let (plc_side, mut plc) = tokio::io::duplex(1024);
        let traffic = Traffic::default();
        let access = if split & 1 == 0 {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let relay = relay::modbus(proxy_side, plc_side, access, &traffic, &|_| {});
        let echo = async move {
            let mut buffer = [0; 512];
            while let Ok(n) = plc.read(&mut buffer).await {
                if n == 0 || plc.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        };
        // Reading while writing, as a TCP client must: a peer that never reads its
        // answers would stall any relay, as it would stall the PLC itself.
        let (mut answers, mut requests) = tokio::io::split(peer);
        let client = async move {
            let write = async {
                for chunk in rest.chunks(usize::from(split).max(1)) {
                    if requests.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = requests.shutdown().await;
            };
            let mut sink = Vec::new();
            let _ = tokio::join!(write, answers.read_to_end(&mut sink));
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tokio::join!(relay, echo, client)
        })
        .await;
    });
});
