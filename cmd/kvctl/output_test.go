package main

import (
	"encoding/json"
	"errors"
	"testing"

	"github.com/kvd/kvd/proto/kvpb"
)

// TestToJSONKV checks that text that is not UTF-8 moves to the *_base64
// field, for keys and values alike, and that keys-only leaves values out.
func TestToJSONKV(t *testing.T) {
	for _, tc := range []struct {
		name     string
		kv       *kvpb.KeyValue
		keysOnly bool
		want     string
	}{
		{"text", &kvpb.KeyValue{Key: []byte("k"), Value: []byte("v"), CreateRevision: 2, ModRevision: 3, Version: 1}, false,
			`{"key":"k","value":"v","create_revision":2,"mod_revision":3,"version":1}`},
		{"binary value", &kvpb.KeyValue{Key: []byte("k"), Value: []byte{0xff, 0}}, false,
			`{"key":"k","value_base64":"/wA=","create_revision":0,"mod_revision":0,"version":0}`},
		{"binary key", &kvpb.KeyValue{Key: []byte{0xfe}, Value: []byte("v")}, false,
			`{"key_base64":"/g==","value":"v","create_revision":0,"mod_revision":0,"version":0}`},
		{"keys only", &kvpb.KeyValue{Key: []byte{0xfe}, Value: []byte{0xff}}, true,
			`{"key_base64":"/g==","create_revision":0,"mod_revision":0,"version":0}`},
	} {
		b, err := json.Marshal(toJSONKV(tc.kv, tc.keysOnly))
		if err != nil || string(b) != tc.want {
			t.Errorf("%s: %s, %v; want %s", tc.name, b, err, tc.want)
		}
	}
}

func TestParseConsistency(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    bool
		wantErr bool
	}{
		{"linearizable", false, false}, {"l", false, false},
		{"serializable", true, false}, {"s", true, false},
		{"eventual", false, true}, {"", false, true}, {"Serializable", false, true},
	} {
		got, err := parseConsistency(tc.in)
		var ee *exitError
		if got != tc.want || (err != nil) != tc.wantErr || (err != nil && (!errors.As(err, &ee) || ee.code != exitUsage)) {
			t.Errorf("parseConsistency(%q) = %v, %v; want %v, error %v (usage)", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}
