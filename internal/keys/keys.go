// Package keys holds the key arithmetic the client, the server and the
// state machine share.
package keys

import (
	"bytes"
	"fmt"
	"strconv"
)

// PrefixEnd returns the end of the range of keys that start with prefix:
// the prefix with its last byte below 0xff incremented and what follows
// it dropped; nil (the end of the key space) when every byte is 0xff.
func PrefixEnd(prefix []byte) []byte {
	end := bytes.Clone(prefix)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

// quoteMax is how much of a key Quote shows.
const quoteMax = 64

// Quote returns k quoted for a message: whole up to 64 bytes, else its
// first 64 bytes and its length. Errors name the keys a request gave, and
// a request may carry megabytes of them: the error must not echo them.
func Quote(k []byte) string {
	if len(k) <= quoteMax {
		return strconv.Quote(string(k))
	}
	return fmt.Sprintf("%q... (%d bytes)", k[:quoteMax], len(k))
}
