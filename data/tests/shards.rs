//! The dataset format, reader, shuffled streams and mixtures: every token read exactly once per
//! epoch, resumable from a cursor without replay.

use std::collections::BTreeMap;
use std::path::Path;

use cpt_data::format::TailPolicy;
use cpt_data::reader::permute;
use cpt_data::{BlockStream, Cursor, DatasetWriter, Mixture, Split, SplitReader, TokenizerInfo};

fn info(vocab_size: usize) -> TokenizerInfo {
    TokenizerInfo { sha256: "test".into(), vocab_size, eos_token_id: 0 }
}

/// Documents of varying length whose tokens encode (document, position), all ≥ 1 (0 is EOS).
fn documents(count: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..count).map(|d| (0..(3 + d * 7 % 23)).map(|i| 1 + ((d * 31 + i * 7) as u32 % (vocab - 1))).collect()).collect()
}

fn write(dir: &Path, docs: &[Vec<u32>], seq_len: usize, vocab: usize) -> cpt_data::Manifest {
    let mut writer = DatasetWriter::create(dir, seq_len, info(vocab)).unwrap();
    for doc in docs {
        writer.push_document(Split::Train, doc).unwrap();
    }
    writer.finish(TailPolicy::Drop, vec!["test".into()], serde_json::Value::Null).unwrap()
}

#[test]
fn blocks_are_the_documents_joined_by_eos_with_the_tail_dropped() {
    for vocab in [1000, 100_000] {
        let tmp = tempfile::tempdir().unwrap();
        let docs = documents(50, 1000);
        let manifest = write(&tmp.path().join("d"), &docs, 16, vocab);
        let stream: Vec<u32> = docs.iter().flat_map(|d| d.iter().copied().chain([0])).collect();
        let train = &manifest.splits[&Split::Train];
        assert_eq!(train.tokens, stream.len() as u64);
        assert_eq!(train.blocks, stream.len() as u64 / 16);
        assert_eq!(train.dropped_tail_tokens, stream.len() as u64 % 16);
        let reader = SplitReader::open(&tmp.path().join("d"), Split::Train).unwrap();
        let read: Vec<u32> = (0..reader.len()).flat_map(|i| reader.block(i)).collect();
        assert_eq!(read, stream[..read.len()], "vocab {vocab}");
    }
}

#[test]
fn permutation_is_a_bijection_for_every_size() {
    for n in [1u64, 2, 3, 5, 16, 17, 100, 1000, 4097] {
        for key in [0, 1, 0xdead_beef] {
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = permute(i, n, key);
                assert!(!seen[j as usize], "n={n} key={key}: {j} twice");
                seen[j as usize] = true;
            }
        }
    }
    let identity = (0..1000).filter(|&i| permute(i, 1000, 7) == i).count();
    assert!(identity < 20, "the permutation barely shuffles: {identity} fixed points");
}

#[test]
fn each_epoch_reads_every_block_once_in_a_new_order() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("d"), &documents(200, 1000), 8, 1000);
    let reader = SplitReader::open(&tmp.path().join("d"), Split::Train).unwrap();
    let n = reader.len();
    let expected: BTreeMap<Vec<u32>, usize> = (0..n).fold(BTreeMap::new(), |mut m, i| {
        *m.entry(reader.block(i)).or_default() += 1;
        m
    });
    let mut stream =
        BlockStream::new(SplitReader::open(&tmp.path().join("d"), Split::Train).unwrap(), 42, Cursor::default())
            .unwrap();
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut counts = BTreeMap::new();
        let mut order = Vec::new();
        for _ in 0..n {
            assert_eq!(stream.cursor.epoch, epoch);
            order.push(stream.peek_index());
            *counts.entry(stream.next_block().tokens).or_default() += 1;
        }
        assert_eq!(counts, expected, "epoch {epoch} must read every block exactly once");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "each epoch has its own order");
    assert_eq!(stream.cursor, Cursor { epoch: 2, position: 0 });
}

#[test]
fn a_stream_resumed_from_its_cursor_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    write(&dir, &documents(100, 1000), 8, 1000);
    let open = |cursor| BlockStream::new(SplitReader::open(&dir, Split::Train).unwrap(), 9, cursor).unwrap();
    let mut uninterrupted = open(Cursor::default());
    let all: Vec<Vec<u32>> = (0..300).map(|_| uninterrupted.next_block().tokens).collect();
    let mut first = open(Cursor::default());
    let mut read: Vec<Vec<u32>> = (0..137).map(|_| first.next_block().tokens).collect();
    let mut resumed = open(first.cursor);
    read.extend((137..300).map(|_| resumed.next_block().tokens));
    assert_eq!(read, all);
}

#[test]
fn a_mixture_follows_its_weights_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write(&a, &documents(300, 500), 8, 1000);
    write(&b, &documents(40, 900), 8, 1000);
    let open = |state: Option<&cpt_data::MixtureState>| {
        let sa = BlockStream::new(SplitReader::open(&a, Split::Train).unwrap(), 1, Cursor::default()).unwrap();
        let sb = BlockStream::new(SplitReader::open(&b, Split::Train).unwrap(), 2, Cursor::default()).unwrap();
        Mixture::new(vec![(sa, 3.0), (sb, 1.0)], 5, state).unwrap()
    };
    let mut mixture = open(None);
    let draws: Vec<(usize, cpt_data::Block)> = (0..4000).map(|_| mixture.next_block()).collect();
    let from_b = draws.iter().filter(|(s, _)| *s == 1).count() as f64 / draws.len() as f64;
    assert!((from_b - 0.25).abs() < 0.03, "source b drew {from_b:.3} of blocks, weight says 0.25");

    let mut first = open(None);
    let mut replay: Vec<(usize, cpt_data::Block)> = (0..1234).map(|_| first.next_block()).collect();
    let mut resumed = open(Some(&first.state()));
    replay.extend((1234..4000).map(|_| resumed.next_block()));
    assert_eq!(replay, draws);
}

#[test]
fn corrupt_or_mismatched_shards_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    write(&dir, &documents(50, 1000), 8, 1000);
    let shard = dir.join("train-00000.tokens");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    let error = SplitReader::open(&dir, Split::Train).err().unwrap().to_string();
    assert!(error.contains("train-00000.tokens"), "{error}");
}

#[test]
fn out_of_vocabulary_tokens_and_existing_outputs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut writer = DatasetWriter::create(&dir, 8, info(100)).unwrap();
    assert!(writer.push_document(Split::Train, &[5, 100]).unwrap_err().to_string().contains("100"));
    drop(writer);
    assert!(!dir.exists(), "an abandoned dataset leaves nothing behind");
    write(&dir, &documents(10, 100), 8, 100);
    assert!(DatasetWriter::create(&dir, 8, info(100)).err().unwrap().to_string().contains("already exists"));
}

#[test]
fn a_padded_tail_is_one_more_block_whose_padding_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut writer = DatasetWriter::create(&dir, 8, info(1000)).unwrap();
    writer.push_document(Split::Train, &[5; 10]).unwrap(); // 11 tokens with EOS: one block and 3 left
    let manifest = writer.finish(TailPolicy::Pad, vec![], serde_json::Value::Null).unwrap();
    let train = &manifest.splits[&Split::Train];
    assert_eq!((train.blocks, train.padded_tokens, train.dropped_tail_tokens), (2, 5, 0));
    let reader = SplitReader::open(&dir, Split::Train).unwrap();
    assert_eq!((reader.valid_tokens(0), reader.valid_tokens(1)), (8, 3));
    assert_eq!(reader.block(1), vec![5, 5, 0, 0, 0, 0, 0, 0]);
}
