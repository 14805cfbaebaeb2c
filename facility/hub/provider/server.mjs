// The embedded facility's identity provider: a real OpenID provider (oidc-provider) playing the
// VO. Its users and their VO groups come from the facility configuration (hub.dev_users); it
// has its own login form, and it states groups the way WLCG tokens do ("wlcg.groups": ["/cms"]).
//
//   node server.mjs SETTINGS.json
//
// SETTINGS.json (written by facility/hub/embedded.py): issuer, port, host, keys file, clients,
// users, access token lifetime, and the storage resource: access tokens for it are JWTs in the
// WLCG profile ("wlcg.ver", "aud", "scope": "storage.read:/"), which the data servers validate
// with the provider's public keys. The facility's own client gets such tokens with the
// client-credentials grant, for reads from a terminal without the hub.
//
// Logging out of the hub ends the session here too (RP-initiated logout: the hub sends the
// browser to /session/end with id_token_hint and post_logout_redirect_uri): this provider asks
// the user to confirm, then sends them back to the hub's login, where another account may sign in.

import { generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = new Map(settings.users.map((user) => [user.username, user]));

function signingKeys(path) {
  if (existsSync(path)) return JSON.parse(readFileSync(path, 'utf8'));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const keys = { keys: [{ ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'facility-1' }] };
  writeFileSync(path, JSON.stringify(keys), { mode: 0o600 });
  return keys;
}

function claimsOf(user) {
  return {
    sub: user.username,
    preferred_username: user.username,
    name: user.username,
    email: user.email || `${user.username}@vo.invalid`,
    'wlcg.groups': user.groups.map((group) => `/${group}`),
  };
}

const storage = settings.storage;

function groupsOf(accountId) {
  const user = accountId && users.get(accountId);
  return user ? user.groups.map((group) => `/${group}`) : storage.local_groups;
}

const provider = new Provider(settings.issuer, {
  clients: settings.clients,
  jwks: signingKeys(settings.keys_file),
  cookies: { keys: [settings.cookie_key] },
  scopes: ['openid', 'profile', 'email', 'offline_access', 'wlcg.groups'],
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email'],
    'wlcg.groups': ['wlcg.groups'],
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    rpInitiatedLogout: { enabled: true, logoutSource, postLogoutSuccessSource },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => storage.audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator, client) => {
        if (indicator !== storage.audience) throw new errors.InvalidTarget();
        const seconds = client.clientId === storage.local_client_id
          ? storage.local_token_seconds : settings.access_token_seconds;
        return { scope: storage.scope, audience: storage.audience, accessTokenFormat: 'jwt',
                 accessTokenTTL: seconds, jwt: { sign: { alg: 'RS256' } } };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => ({
    'wlcg.ver': '1.0',
    'wlcg.groups': groupsOf(token.accountId),
    nbf: Math.floor(Date.now() / 1000) - 5,
  }),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => {
    const user = users.get(id);
    if (!user) return undefined;
    return { accountId: id, claims: async () => claimsOf(user) };
  },
  // The hub reads name and groups from the ID token: the access token is for the data servers,
  // and userinfo accepts only tokens issued for it.
  conformIdTokenClaims: false,
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: { AccessToken: settings.access_token_seconds, IdToken: settings.access_token_seconds },
  pkce: { required: () => false },
});
provider.proxy = true;

const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>${escape(title)}</title>
<style>body{font-family:sans-serif;max-width:26em;margin:4em auto}label{display:block;margin:.6em 0}
input{width:100%;padding:.4em}button{margin:.3em .3em 0 0}.error{color:#a00}</style></head><body>
${body}</body></html>`;
}

function loginPage(uid, clientId, message) {
  const error = message ? `<p class="error" role="alert">${escape(message)}</p>` : '';
  return page('VO sign-in', `<h1>Sign in to the VO</h1><p>${escape(clientId)} asks for your identity and VO groups.</p>${error}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>Username <input name="username" autocomplete="username" autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form>`);
}

// The confirmation oidc-provider asks for before it ends a session; "logout=yes" ends the
// whole session, the other button only this client's sign-in.
async function logoutSource(ctx, form) {
  const who = ctx.oidc.session.accountId;
  const signedIn = who ? `You are signed in to the VO as <strong>${escape(who)}</strong>. ` : '';
  ctx.body = page('VO sign-out', `<h1>Sign out of the VO</h1>
<p>${signedIn}Signing out here too means the next sign-in asks who you are.</p>${form}
<button type="submit" form="op.logoutForm" name="logout" value="yes" autofocus>Sign out of the VO</button>
<button type="submit" form="op.logoutForm">Stay signed in to the VO</button>`);
}

// Shown only when a logout names no address to go back to.
async function postLogoutSuccessSource(ctx) {
  ctx.body = page('VO sign-out', '<h1>Signed out</h1><p>You are signed out of the VO.</p>');
}

async function formBody(req) {
  let raw = '';
  for await (const piece of req) raw += piece;
  return Object.fromEntries(new URLSearchParams(raw));
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

// The hub is the facility's own client: consent is granted for what it asked.
async function grantConsent(details) {
  const { prompt, params, session, grantId } = details;
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return { consent: { grantId: await grant.save() } };
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.prompt.name === 'consent') {
    return provider.interactionFinished(req, res, await grantConsent(details), { mergeWithLastSubmission: true });
  }
  if (action !== 'login') return send(res, 200, loginPage(uid, details.params.client_id));
  const { username, password } = await formBody(req);
  const user = users.get(username);
  if (!user || user.password !== password) {
    return send(res, 401, loginPage(uid, details.params.client_id, 'Unknown user or wrong password.'));
  }
  return provider.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const match = req.url.match(/^\/interaction\/([^/?]+)(?:\/(login))?/);
  if (!match) return callback(req, res);
  try {
    await interaction(req, res, match[1], req.method === 'POST' ? match[2] : undefined);
  } catch (error) {
    console.error(error);
    send(res, 400, `<p>Sign-in failed: ${escape(error.message)}. Start again from the hub.</p>`);
  }
});
server.listen(settings.port, settings.host, () => {
  console.log(`identity provider ${settings.issuer} listening on ${settings.host}:${settings.port}`);
});
