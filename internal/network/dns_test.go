//go:build linux

package network

import (
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func FuzzDNSQuery(f *testing.F) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 1, RecursionDesired: true})
	_ = b.StartQuestions()
	_ = b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("www.example.com."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	q, _ := b.Finish()
	f.Add(q)
	f.Add([]byte{0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0})
	r := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 1, Response: true})
	_ = r.StartQuestions()
	_ = r.Question(dnsmessage.Question{Name: dnsmessage.MustNewName("a.b."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	_ = r.StartAnswers()
	_ = r.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("a.b."), Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: [4]byte{1, 2, 3, 4}})
	resp, _ := r.Finish()
	f.Add(resp)
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _, name, out := parseQuery(data)
		if name != "" && out != nil {
			t.Fatal("both a name and a response")
		}
		addrs, ttl := answerA(data)
		if len(addrs) > 0 && (ttl < dnsMinTTL || ttl > dnsMaxTTL) {
			t.Fatalf("ttl %v", ttl)
		}
	})
}
